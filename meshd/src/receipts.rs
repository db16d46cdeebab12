//! Receipts for the jobs this device ran, kept on disk until the
//! coordinator has them, so that neither a job's answer nor the credit for
//! it waits on the coordinator, and a restart loses none.
//!
//! The queue is a directory (`receipts/` in the state dir) holding one file
//! per signed receipt, named by when it was queued so that names sort
//! oldest first. A receipt is written to a temp name, fsynced, renamed and
//! the directory fsynced. One file each, rather than an append-only log,
//! because delivery settles receipts one by one and in any order (recorded,
//! refused, kept for a retry): removing one is an unlink, with no log to
//! rewrite or compact; a write torn by a crash leaves only a temp file,
//! removed at the next start; a damaged file costs its own receipt only,
//! and is moved to `receipts/corrupt/`.
//!
//! The delivery task posts the oldest receipts in batches to the
//! coordinator's `/api/v1/receipts`, forgets those it has an answer for,
//! and retries the rest with backoff, and at once when the map stream
//! comes back.
//!
//! Concurrency: the index of files is behind a std `Mutex`, held for
//! in-memory changes only (never across I/O); files are written, read and
//! removed on blocking threads.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use compute::admission::{self, JobOutcome};
use platform::jobs::{
    JobStatus, Receipt, ReceiptBatch, ReceiptBatchResult, ReceiptOutcome, ReceiptResult,
    DOMAIN_RECEIPT, MAX_RECEIPTS_PER_BATCH,
};
use platform::keys::DevicePrivate;
use platform::signed::Signed;
use tokio::sync::{watch, Notify};

use crate::control::{self, MapState};
use crate::tickets::Checked;

/// The queue's directory in the state dir.
pub const DIR: &str = "receipts";
/// Where damaged receipt files are moved, inside the queue.
const CORRUPT_DIR: &str = "corrupt";
/// Receipts kept at most; beyond, the device takes no new jobs.
pub const MAX_QUEUED: usize = 100_000;
/// Bytes of receipts kept at most.
pub const MAX_QUEUED_BYTES: u64 = 64 << 20;
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long the coordinator may take to answer one batch.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the worker states about a job it ran for `checked`.
pub fn receipt(checked: &Checked, worker: &str, outcome: &JobOutcome) -> Receipt {
    Receipt {
        ticket_hash: checked.hash.clone(),
        ticket: checked.signed.clone(),
        job_id: checked.ticket.job_id.clone(),
        // Each attempt is its own piece of billed work: a job a gateway
        // retried after a worker failed leaves one receipt per attempt that
        // ran, none conflicting with another.
        chunk_id: checked.ticket.attempt.saturating_sub(1),
        worker: worker.to_owned(),
        started_at_ms: outcome.started_at_ms,
        ended_at_ms: outcome.ended_at_ms,
        runtime_ms: outcome.runtime_ms,
        units: outcome.units,
        output_sha256: outcome.output_sha256.clone(),
        status: match outcome.status {
            admission::JobStatus::Ok => JobStatus::Ok,
            admission::JobStatus::Failed => JobStatus::Failed,
            admission::JobStatus::Cancelled => JobStatus::Cancelled,
        },
    }
}

/// Signs `receipt` as this device.
pub fn sign(device: &DevicePrivate, receipt: &Receipt) -> Signed {
    Signed::sign(device, DOMAIN_RECEIPT, receipt)
}

/// The files queued: name → size.
#[derive(Default)]
struct Index {
    files: BTreeMap<String, u64>,
    bytes: u64,
    /// Names taken by writes in progress.
    writing: usize,
    next: u64,
}

const OUTCOMES: [(ReceiptOutcome, &str); 4] = [
    (ReceiptOutcome::Recorded, "recorded"),
    (ReceiptOutcome::Duplicate, "duplicate"),
    (ReceiptOutcome::Conflict, "conflict"),
    (ReceiptOutcome::Refused, "refused"),
];

fn outcome_index(o: ReceiptOutcome) -> usize {
    OUTCOMES.iter().position(|(x, _)| *x == o).unwrap_or(0)
}

#[derive(Default)]
struct Counters {
    enqueued: AtomicU64,
    unwritten: AtomicU64,
    corrupt: AtomicU64,
    delivered: [AtomicU64; 4],
}

/// The durable queue of receipts waiting for the coordinator.
pub struct ReceiptQueue {
    dir: PathBuf,
    index: Mutex<Index>,
    /// Told when a receipt is queued.
    wake: Notify,
    counters: Counters,
    max_count: usize,
    max_bytes: u64,
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl ReceiptQueue {
    /// Opens the queue in `dir` (created if missing), bounded by
    /// [`MAX_QUEUED`] and [`MAX_QUEUED_BYTES`].
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Self::open_bounded(dir, MAX_QUEUED, MAX_QUEUED_BYTES)
    }

    /// Lists the queued files (read only when delivered) and removes temp
    /// files of writes a crash cut short.
    pub fn open_bounded(dir: &Path, max_count: usize, max_bytes: u64) -> anyhow::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut index = Index::default();
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata()?;
            if !meta.is_file() {
                continue;
            }
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            } else if name.ends_with(".json") {
                index.bytes += meta.len();
                index.files.insert(name, meta.len());
            }
        }
        if !index.files.is_empty() {
            tracing::info!(
                receipts = index.files.len(),
                "receipts from an earlier run wait for delivery"
            );
        }
        Ok(ReceiptQueue {
            dir: dir.to_owned(),
            index: Mutex::new(index),
            wake: Notify::new(),
            counters: Counters::default(),
            max_count,
            max_bytes,
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.index().files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// No room for another job's receipt.
    pub fn is_full(&self) -> bool {
        let i = self.index();
        i.files.len() + i.writing >= self.max_count || i.bytes >= self.max_bytes
    }

    /// Writes `receipt` to the queue, durably; blocks for the disk.
    pub fn push(&self, receipt: &Signed) -> anyhow::Result<()> {
        let written = self.write(receipt);
        if written.is_err() {
            self.counters.unwritten.fetch_add(1, Ordering::Relaxed);
        }
        written
    }

    fn write(&self, receipt: &Signed) -> anyhow::Result<()> {
        let body = serde_json::to_vec(receipt)?;
        let name = {
            let mut i = self.index();
            let now = platform::unix_now_ms();
            let name = loop {
                i.next += 1;
                let name = format!("{now:013}-{:08}.json", i.next);
                if !i.files.contains_key(&name) {
                    break name;
                }
            };
            i.writing += 1;
            name
        };
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            sync_dir(&self.dir)
        })();
        let mut i = self.index();
        i.writing -= 1;
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("writing {}", path.display()));
        }
        let size = body.len() as u64;
        i.bytes += size;
        i.files.insert(name, size);
        drop(i);
        self.counters.enqueued.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
        Ok(())
    }

    /// Names of the receipts queued, oldest first.
    fn names(&self) -> Vec<String> {
        self.index().files.keys().cloned().collect()
    }

    fn forget(&self, name: &str) {
        let mut i = self.index();
        if let Some(size) = i.files.remove(name) {
            i.bytes -= size;
        }
    }

    /// The receipt in file `name`; a damaged one is moved aside.
    fn load(&self, name: &str) -> Option<Signed> {
        let path = self.dir.join(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(name);
                return None;
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "reading a receipt");
                return None;
            }
        };
        let parsed = serde_json::from_slice::<Signed>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|s| match serde_json::from_str::<Receipt>(&s.payload) {
                Ok(_) => Ok(s),
                Err(e) => Err(e.to_string()),
            });
        match parsed {
            Ok(s) => Some(s),
            Err(why) => {
                self.move_aside(name, &why);
                None
            }
        }
    }

    fn move_aside(&self, name: &str, why: &str) {
        let aside = self.dir.join(CORRUPT_DIR);
        let moved = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&aside)
            .and_then(|()| fs::rename(self.dir.join(name), aside.join(name)));
        tracing::error!(
            file = name,
            error = why,
            moved = moved.is_ok(),
            "damaged receipt moved out of the queue"
        );
        if moved.is_err() {
            let _ = fs::remove_file(self.dir.join(name));
        }
        self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        self.forget(name);
    }

    /// Removes a receipt the coordinator answered for.
    fn remove(&self, name: &str) {
        match fs::remove_file(self.dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = name, error = %e, "removing a delivered receipt"),
        }
        self.forget(name);
    }

    /// Lines for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        let (count, bytes) = {
            let i = self.index();
            (i.files.len(), i.bytes)
        };
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str(&format!(
            "# TYPE compute_receipts_queued gauge\ncompute_receipts_queued {count}\n\
             # TYPE compute_receipts_queued_bytes gauge\ncompute_receipts_queued_bytes {bytes}\n\
             # TYPE compute_receipts_enqueued counter\ncompute_receipts_enqueued_total {}\n\
             # TYPE compute_receipts_unwritten counter\ncompute_receipts_unwritten_total {}\n\
             # TYPE compute_receipts_corrupt counter\ncompute_receipts_corrupt_total {}\n\
             # TYPE compute_receipts_delivered counter\n",
            l(&c.enqueued),
            l(&c.unwritten),
            l(&c.corrupt),
        ));
        for ((_, name), n) in OUTCOMES.iter().zip(&c.delivered) {
            out.push_str(&format!(
                "compute_receipts_delivered_total{{outcome=\"{name}\"}} {}\n",
                l(n)
            ));
        }
    }
}

/// Each sent receipt's result: the one at its position when it names the
/// same job and chunk, else the first that does; none when the coordinator
/// gave none.
fn match_results<'a>(
    sent: &[(String, u32)],
    results: &'a [ReceiptResult],
) -> Vec<Option<&'a ReceiptResult>> {
    let same =
        |r: &ReceiptResult, (job, chunk): &(String, u32)| r.job_id == *job && r.chunk_id == *chunk;
    sent.iter()
        .enumerate()
        .map(|(i, key)| {
            results
                .get(i)
                .filter(|r| same(r, key))
                .or_else(|| results.iter().find(|r| same(r, key)))
        })
        .collect()
}

/// What one pass over the queue did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Round {
    settled: usize,
    kept: usize,
}

/// Why a pass stopped early: the coordinator could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("no answer from {url}: {source}")]
struct Unreachable {
    url: String,
    #[source]
    source: reqwest::Error,
}

/// Posts one batch: the coordinator's results, or `None` when it declined
/// the batch as a whole (logged).
async fn post_batch(
    http: &reqwest::Client,
    url: &str,
    batch: &ReceiptBatch,
) -> Result<Option<ReceiptBatchResult>, Unreachable> {
    let unreachable = |source| Unreachable {
        url: url.to_owned(),
        source,
    };
    let resp = http
        .post(url)
        .json(batch)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(unreachable)?;
    let status = resp.status();
    let text = resp.text().await.map_err(unreachable)?;
    if !status.is_success() {
        let text: String = text.chars().take(200).collect();
        tracing::warn!(%status, answer = %text, receipts = batch.receipts.len(), "the coordinator declined a batch of receipts; kept");
        return Ok(None);
    }
    match serde_json::from_str(&text) {
        Ok(r) => Ok(Some(r)),
        Err(e) => {
            tracing::warn!(error = %e, "unreadable answer to a batch of receipts; kept");
            Ok(None)
        }
    }
}

/// A queued receipt, with the job and chunk it is for.
type Loaded = (String, Signed, (String, u32));

/// The receipts in files `names`, and how many of those stay queued
/// unread (an I/O error; damaged ones are moved aside).
fn load_batch(queue: &ReceiptQueue, names: Vec<String>) -> (Vec<Loaded>, usize) {
    let mut loaded = Vec::with_capacity(names.len());
    let mut unreadable = 0;
    for name in names {
        match queue.load(&name) {
            Some(s) => match serde_json::from_str::<Receipt>(&s.payload) {
                Ok(r) => loaded.push((name, s, (r.job_id, r.chunk_id))),
                Err(_) => unreadable += 1,
            },
            None if queue.index().files.contains_key(&name) => unreadable += 1,
            None => {}
        }
    }
    (loaded, unreadable)
}

/// Offers every queued receipt once, `batch` at a time, oldest first.
/// Stops at the first batch the coordinator does not answer at all.
async fn deliver_round(
    http: &reqwest::Client,
    url: &str,
    queue: &Arc<ReceiptQueue>,
    batch: usize,
) -> Result<Round, Unreachable> {
    let mut round = Round::default();
    for names in queue.names().chunks(batch.max(1)) {
        let (q, names) = (queue.clone(), names.to_vec());
        let (loaded, unreadable) = tokio::task::spawn_blocking(move || load_batch(&q, names))
            .await
            .unwrap_or_default();
        round.kept += unreadable;
        if loaded.is_empty() {
            continue;
        }
        let body = ReceiptBatch {
            receipts: loaded.iter().map(|(_, s, _)| s.clone()).collect(),
        };
        let Some(answer) = post_batch(http, url, &body).await? else {
            round.kept += loaded.len();
            continue;
        };
        let keys: Vec<_> = loaded.iter().map(|(_, _, k)| k.clone()).collect();
        let mut done = Vec::new();
        for ((name, _, (job, _)), result) in
            loaded.iter().zip(match_results(&keys, &answer.results))
        {
            let Some(r) = result else {
                round.kept += 1;
                continue;
            };
            match r.outcome {
                ReceiptOutcome::Recorded | ReceiptOutcome::Duplicate => {}
                ReceiptOutcome::Conflict | ReceiptOutcome::Refused => tracing::warn!(
                    job = %job,
                    outcome = ?r.outcome,
                    reason = r.error.as_deref().unwrap_or(""),
                    "the coordinator did not take a receipt; dropped"
                ),
            }
            queue.counters.delivered[outcome_index(r.outcome)].fetch_add(1, Ordering::Relaxed);
            done.push(name.clone());
        }
        round.settled += done.len();
        let q = queue.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for name in &done {
                q.remove(name);
            }
            let _ = sync_dir(&q.dir);
        })
        .await;
    }
    Ok(round)
}

/// Resolves when the map stream comes back after being down; never, once
/// the session is gone.
async fn reconnected(map: &mut watch::Receiver<MapState>) {
    let down = map.wait_for(|m| !m.connected).await.is_ok();
    let up = down && map.wait_for(|m| m.connected).await.is_ok();
    if !up {
        std::future::pending::<()>().await;
    }
}

/// Delivers the queue to `coordinator` for as long as the task lives.
pub async fn deliver(
    queue: Arc<ReceiptQueue>,
    coordinator: String,
    ca_file: Option<PathBuf>,
    mut map: watch::Receiver<MapState>,
) {
    let url = format!("{}/api/v1/receipts", coordinator.trim_end_matches('/'));
    let mut backoff = MIN_BACKOFF;
    let mut client: Option<reqwest::Client> = None;
    loop {
        if queue.is_empty() {
            queue.wake.notified().await;
            continue;
        }
        let made = match client.clone() {
            Some(http) => Ok(http),
            None => control::coordinator_http(ca_file.as_deref()),
        };
        let all_settled = match made {
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "receipts wait: no HTTP client");
                false
            }
            Ok(http) => {
                client = Some(http.clone());
                match deliver_round(&http, &url, &queue, MAX_RECEIPTS_PER_BATCH).await {
                    Ok(round) => {
                        tracing::debug!(
                            delivered = round.settled,
                            kept = round.kept,
                            "receipts offered"
                        );
                        round.kept == 0
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, ?backoff, "receipts wait for the coordinator");
                        // A fresh client next time: the CA file may have changed.
                        client = None;
                        false
                    }
                }
            }
        };
        if all_settled {
            backoff = MIN_BACKOFF;
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = reconnected(&mut map) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::{Json, Router};
    use platform::jobs::{ticket_hash, Route, Sensitivity, Ticket, Workload, DOMAIN_TICKET};

    fn signed_receipt(worker: &DevicePrivate, job: &str) -> Signed {
        let submitter = DevicePrivate::generate();
        let ticket = Ticket {
            job_id: job.into(),
            network: "home".into(),
            submitter_device: "laptop".into(),
            submitter_user: "ann".into(),
            workload: Workload::Embeddings,
            model: "all-minilm-l6-v2".into(),
            route: Route::Auto,
            sensitivity: Sensitivity::Public,
            max_cost: 1000,
            timeout_ms: 1000,
            issued_at: 100,
            expires_at: 200,
            worker: "gpu".into(),
            worker_key: worker.public(),
            attempt: 1,
        };
        let signed = Signed::sign(&submitter, DOMAIN_TICKET, &ticket);
        let checked = Checked {
            hash: ticket_hash(&signed),
            signed,
            ticket,
        };
        let outcome = JobOutcome {
            started_at_ms: 150_000,
            ended_at_ms: 150_250,
            runtime_ms: 250,
            units: 3,
            output_sha256: admission::sha256_hex(job.as_bytes()),
            status: admission::JobStatus::Ok,
        };
        sign(worker, &receipt(&checked, "gpu", &outcome))
    }

    fn job_of(s: &Signed) -> String {
        serde_json::from_str::<Receipt>(&s.payload).unwrap().job_id
    }

    fn queued(q: &ReceiptQueue) -> Vec<String> {
        q.names()
            .iter()
            .filter_map(|n| q.load(n))
            .map(|s| job_of(&s))
            .collect()
    }

    /// How the test coordinator answers a receipt, by job id.
    #[derive(Clone, Copy)]
    enum Answer {
        Outcome(ReceiptOutcome),
        /// No result for it.
        Omit,
        /// 500 for its whole batch.
        Fail,
    }

    #[derive(Default)]
    struct Coordinator {
        answers: HashMap<String, Answer>,
        seen: Mutex<Vec<String>>,
    }

    async fn receipts_api(
        State(c): State<Arc<Coordinator>>,
        Json(batch): Json<ReceiptBatch>,
    ) -> Result<Json<ReceiptBatchResult>, StatusCode> {
        let mut results = Vec::new();
        let mut fail = false;
        for s in &batch.receipts {
            let r: Receipt = s.open(DOMAIN_RECEIPT).expect("signed by the worker");
            assert_eq!(r.ticket_hash, ticket_hash(&r.ticket));
            c.seen.lock().unwrap().push(r.job_id.clone());
            match c.answers.get(&r.job_id).copied() {
                Some(Answer::Fail) => fail = true,
                Some(Answer::Omit) => {}
                a => results.push(ReceiptResult {
                    job_id: r.job_id,
                    chunk_id: r.chunk_id,
                    outcome: match a {
                        Some(Answer::Outcome(o)) => o,
                        _ => ReceiptOutcome::Recorded,
                    },
                    error: None,
                }),
            }
        }
        if fail {
            return Err(StatusCode::INTERNAL_SERVER_ERROR);
        }
        Ok(Json(ReceiptBatchResult { results }))
    }

    /// A coordinator's receipts API on loopback; its URL.
    async fn coordinator(answers: &[(&str, Answer)]) -> (String, Arc<Coordinator>) {
        let c = Arc::new(Coordinator {
            answers: answers.iter().map(|(j, a)| ((*j).to_owned(), *a)).collect(),
            seen: Mutex::default(),
        });
        let app = Router::new()
            .route("/api/v1/receipts", post(receipts_api))
            .with_state(c.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, c)
    }

    fn http() -> reqwest::Client {
        control::coordinator_http(None).unwrap()
    }

    #[test]
    fn queued_receipts_survive_a_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let worker = DevicePrivate::generate();
        let q = ReceiptQueue::open(dir.path()).unwrap();
        let sent: Vec<Signed> = ["aa", "bb", "cc"]
            .iter()
            .map(|j| signed_receipt(&worker, j))
            .collect();
        for s in &sent {
            q.push(s).unwrap();
        }
        assert_eq!(q.len(), 3);
        drop(q);
        fs::write(
            dir.path().join("0000000000001-00000001.json.tmp"),
            b"{\"half",
        )
        .unwrap();
        let q = ReceiptQueue::open(dir.path()).unwrap();
        let back: Vec<Signed> = q.names().iter().filter_map(|n| q.load(n)).collect();
        assert_eq!(back, sent, "same receipts, oldest first");
        assert!(
            !dir.path().join("0000000000001-00000001.json.tmp").exists(),
            "a torn write is cleared"
        );
        let mut m = String::new();
        q.render_metrics(&mut m);
        assert!(m.contains("compute_receipts_queued 3\n"), "{m}");
        use std::os::unix::fs::PermissionsExt as _;
        let name = q.names().remove(0);
        let mode = fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_full_queue_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let worker = DevicePrivate::generate();
        let q = ReceiptQueue::open_bounded(dir.path(), 2, u64::MAX).unwrap();
        q.push(&signed_receipt(&worker, "aa")).unwrap();
        assert!(!q.is_full());
        q.push(&signed_receipt(&worker, "bb")).unwrap();
        assert!(q.is_full());
        q.remove(&q.names()[0]);
        assert!(!q.is_full());
        let q = ReceiptQueue::open_bounded(dir.path(), 100, 10).unwrap();
        assert!(q.is_full(), "over the byte bound");
    }

    #[tokio::test]
    async fn delivery_keeps_exactly_the_receipts_the_coordinator_failed() {
        let dir = tempfile::tempdir().unwrap();
        let worker = DevicePrivate::generate();
        let q = Arc::new(ReceiptQueue::open(dir.path()).unwrap());
        for j in ["a1", "b2", "c3", "d4", "e5"] {
            q.push(&signed_receipt(&worker, j)).unwrap();
        }
        let recorded = Answer::Outcome(ReceiptOutcome::Recorded);
        let (url, c) = coordinator(&[
            ("a1", recorded),
            ("b2", Answer::Fail),
            ("c3", recorded),
            ("d4", Answer::Fail),
            ("e5", recorded),
        ])
        .await;
        let url = format!("{url}/api/v1/receipts");
        let round = deliver_round(&http(), &url, &q, 1).await.unwrap();
        assert_eq!(
            round,
            Round {
                settled: 3,
                kept: 2
            }
        );
        assert_eq!(queued(&q), ["b2", "d4"]);
        assert_eq!(c.seen.lock().unwrap().len(), 5);
        let mut m = String::new();
        q.render_metrics(&mut m);
        assert!(
            m.contains("compute_receipts_delivered_total{outcome=\"recorded\"} 3\n"),
            "{m}"
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "files gone");
    }

    #[tokio::test]
    async fn every_answer_but_none_settles_a_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let worker = DevicePrivate::generate();
        let q = Arc::new(ReceiptQueue::open(dir.path()).unwrap());
        for j in ["a1", "b2", "c3", "d4", "e5"] {
            q.push(&signed_receipt(&worker, j)).unwrap();
        }
        let (url, _) = coordinator(&[
            ("a1", Answer::Outcome(ReceiptOutcome::Recorded)),
            ("b2", Answer::Outcome(ReceiptOutcome::Duplicate)),
            ("c3", Answer::Omit),
            ("d4", Answer::Outcome(ReceiptOutcome::Conflict)),
            ("e5", Answer::Outcome(ReceiptOutcome::Refused)),
        ])
        .await;
        let url = format!("{url}/api/v1/receipts");
        let round = deliver_round(&http(), &url, &q, MAX_RECEIPTS_PER_BATCH)
            .await
            .unwrap();
        assert_eq!(
            round,
            Round {
                settled: 4,
                kept: 1
            }
        );
        assert_eq!(queued(&q), ["c3"]);
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let worker = DevicePrivate::generate();
        let q = Arc::new(ReceiptQueue::open(dir.path()).unwrap());
        q.push(&signed_receipt(&worker, "a1")).unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/api/v1/receipts", closed.local_addr().unwrap());
        drop(closed);
        assert!(deliver_round(&http(), &url, &q, 10).await.is_err());
        assert_eq!(queued(&q), ["a1"]);
    }

    #[tokio::test]
    async fn a_damaged_receipt_is_moved_aside_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let worker = DevicePrivate::generate();
        let q = ReceiptQueue::open(dir.path()).unwrap();
        q.push(&signed_receipt(&worker, "a1")).unwrap();
        drop(q);
        fs::write(
            dir.path().join("0000000000000-00000001.json"),
            b"\0\0garbage",
        )
        .unwrap();
        let not_a_receipt = Signed::sign(&worker, DOMAIN_RECEIPT, &"hello");
        fs::write(
            dir.path().join("0000000000000-00000002.json"),
            serde_json::to_vec(&not_a_receipt).unwrap(),
        )
        .unwrap();
        let q = Arc::new(ReceiptQueue::open(dir.path()).unwrap());
        assert_eq!(q.len(), 3);
        let (url, c) = coordinator(&[]).await;
        let url = format!("{url}/api/v1/receipts");
        let round = deliver_round(&http(), &url, &q, 10).await.unwrap();
        assert_eq!(
            round,
            Round {
                settled: 1,
                kept: 0
            }
        );
        assert_eq!(*c.seen.lock().unwrap(), ["a1"]);
        assert!(q.is_empty());
        let aside = fs::read_dir(dir.path().join(CORRUPT_DIR)).unwrap().count();
        assert_eq!(aside, 2);
        let mut m = String::new();
        q.render_metrics(&mut m);
        assert!(m.contains("compute_receipts_corrupt_total 2\n"), "{m}");
    }

    async fn until_empty(q: &ReceiptQueue) -> bool {
        for _ in 0..250 {
            if q.is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn the_next_run_delivers_what_an_earlier_one_queued() {
        let dir = tempfile::tempdir().unwrap();
        let worker = DevicePrivate::generate();
        let q = ReceiptQueue::open(dir.path()).unwrap();
        q.push(&signed_receipt(&worker, "a1")).unwrap();
        q.push(&signed_receipt(&worker, "b2")).unwrap();
        drop(q);
        let (url, c) = coordinator(&[]).await;
        let q = Arc::new(ReceiptQueue::open(dir.path()).unwrap());
        let (_map_tx, map) = watch::channel(MapState::default());
        let task = tokio::spawn(deliver(q.clone(), format!("{url}/"), None, map));
        assert!(until_empty(&q).await, "delivered at start");
        // A receipt queued later wakes the task.
        q.push(&signed_receipt(&worker, "c3")).unwrap();
        assert!(until_empty(&q).await, "delivered when queued");
        assert_eq!(*c.seen.lock().unwrap(), ["a1", "b2", "c3"]);
        task.abort();
    }
}
