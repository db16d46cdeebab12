//! What the gateway remembers of recent jobs (`meshd jobs`, `meshd jobs
//! show`): where each went and why, every attempt and its cause, and the
//! Prometheus figures over all of them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use platform::jobs::{Route, Workload};
use serde::{Deserialize, Serialize};

/// Jobs kept for `meshd jobs`; older ones are forgotten.
pub const KEPT_JOBS: usize = 500;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Completed,
    Failed,
}

/// One try of a job on one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub device: String,
    /// `ok`, `declined`, `refused`, `unreachable`, `timeout`, `failed`.
    pub outcome: String,
    /// What the worker or the network said, when it did not work.
    pub cause: Option<String>,
    pub elapsed_ms: u64,
    /// `direct`, `relay` or `local`.
    pub path: String,
}

/// A job as the submitting device saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub workload: Workload,
    pub model: String,
    pub route: Route,
    pub stream: bool,
    pub state: JobState,
    /// Unix milliseconds.
    pub started_at_ms: u64,
    pub latency_ms: Option<u64>,
    /// The device the current attempt is on, while running.
    #[serde(default)]
    pub trying: Option<String>,
    pub served_by: Option<String>,
    /// Micro-credits the job may burn at most (its timeout at the chosen
    /// worker's tier).
    pub estimated_cost: u64,
    pub attempts: Vec<Attempt>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// The scheduler's view: every candidate, its filters and score terms.
    pub placement: serde_json::Value,
}

/// Latency buckets of the job histogram, seconds.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

#[derive(Default)]
struct WorkloadMetrics {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ms: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
}

#[derive(Default)]
pub struct JobLog {
    jobs: Mutex<VecDeque<JobRecord>>,
    metrics: [WorkloadMetrics; 2],
    retries: AtomicU64,
    refused_up_front: AtomicU64,
}

fn index(w: Workload) -> usize {
    match w {
        Workload::Embeddings => 0,
        Workload::SmallChat => 1,
    }
}

impl JobLog {
    fn jobs(&self) -> std::sync::MutexGuard<'_, VecDeque<JobRecord>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn start(&self, record: JobRecord) {
        let mut jobs = self.jobs();
        if jobs.len() >= KEPT_JOBS {
            jobs.pop_front();
        }
        jobs.push_back(record);
    }

    /// Changes the record of job `id`, if it is still kept.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut JobRecord)) {
        if let Some(r) = self.jobs().iter_mut().rev().find(|r| r.id == id) {
            f(r);
        }
    }

    /// A job that never reached a worker (no eligible device, no credits).
    pub fn refused(&self) {
        self.refused_up_front.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how job `id` ended.
    pub fn finish(&self, id: &str, workload: Workload, ok: bool, latency_ms: u64) {
        let m = &self.metrics[index(workload)];
        let secs = latency_ms as f64 / 1000.0;
        for (b, le) in m.buckets.iter().zip(BUCKETS) {
            if secs <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        m.count.fetch_add(1, Ordering::Relaxed);
        m.sum_ms.fetch_add(latency_ms, Ordering::Relaxed);
        if ok {
            m.completed.fetch_add(1, Ordering::Relaxed);
        } else {
            m.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.update(id, |r| {
            r.latency_ms = Some(latency_ms);
            r.trying = None;
            if r.state == JobState::Running {
                r.state = if ok {
                    JobState::Completed
                } else {
                    JobState::Failed
                };
            }
        });
    }

    /// The most recent jobs, newest first.
    pub fn recent(&self, limit: usize) -> Vec<JobRecord> {
        self.jobs().iter().rev().take(limit).cloned().collect()
    }

    /// A job by id, or by a unique prefix of it.
    pub fn find(&self, id: &str) -> Option<JobRecord> {
        let jobs = self.jobs();
        let mut hits = jobs.iter().filter(|r| r.id.starts_with(id));
        match (hits.next(), hits.next()) {
            (Some(r), None) => Some(r.clone()),
            _ => None,
        }
    }

    /// Prometheus text.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        out.push_str("# HELP crank_gateway_job_seconds Time from request to the end of the answer.\n# TYPE crank_gateway_job_seconds histogram\n");
        for w in Workload::ALL {
            let m = &self.metrics[index(w)];
            for (b, le) in m.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "crank_gateway_job_seconds_bucket{{workload=\"{w}\",le=\"{le}\"}} {}",
                    b.load(Ordering::Relaxed)
                );
            }
            let count = m.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "crank_gateway_job_seconds_bucket{{workload=\"{w}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "crank_gateway_job_seconds_sum{{workload=\"{w}\"}} {}",
                m.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0
            );
            let _ = writeln!(
                out,
                "crank_gateway_job_seconds_count{{workload=\"{w}\"}} {count}"
            );
        }
        out.push_str("# HELP crank_gateway_jobs_total Jobs by how they ended.\n# TYPE crank_gateway_jobs_total counter\n");
        for w in Workload::ALL {
            let m = &self.metrics[index(w)];
            let _ = writeln!(
                out,
                "crank_gateway_jobs_total{{workload=\"{w}\",outcome=\"completed\"}} {}",
                m.completed.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "crank_gateway_jobs_total{{workload=\"{w}\",outcome=\"failed\"}} {}",
                m.failed.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP crank_gateway_retries_total Attempts after the first.\n# TYPE crank_gateway_retries_total counter\ncrank_gateway_retries_total {}",
            self.retries.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP crank_gateway_refused_total Jobs refused before reaching a worker.\n# TYPE crank_gateway_refused_total counter\ncrank_gateway_refused_total {}",
            self.refused_up_front.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> JobRecord {
        JobRecord {
            id: id.into(),
            workload: Workload::Embeddings,
            model: "m".into(),
            route: Route::Auto,
            stream: false,
            state: JobState::Running,
            started_at_ms: 0,
            latency_ms: None,
            trying: None,
            served_by: None,
            estimated_cost: 0,
            attempts: vec![],
            error: None,
            placement: serde_json::Value::Null,
        }
    }

    #[test]
    fn keeps_the_latest_jobs_and_finds_them_by_prefix() {
        let log = JobLog::default();
        for i in 0..KEPT_JOBS + 3 {
            log.start(record(&format!("{i:08x}")));
        }
        let recent = log.recent(usize::MAX);
        assert_eq!(recent.len(), KEPT_JOBS);
        assert_eq!(recent[0].id, format!("{:08x}", KEPT_JOBS + 2));
        assert!(log.find("00000000").is_none(), "forgotten");
        assert!(log.find("0000").is_none(), "ambiguous");
        assert_eq!(log.find("00000005").unwrap().id, "00000005");
    }

    #[test]
    fn outcomes_reach_records_and_metrics() {
        let log = JobLog::default();
        log.start(record("a1"));
        log.start(record("b2"));
        log.finish("a1", Workload::Embeddings, true, 120);
        log.finish("b2", Workload::Embeddings, false, 3000);
        log.retried();
        assert_eq!(log.find("a1").unwrap().state, JobState::Completed);
        assert_eq!(log.find("b2").unwrap().state, JobState::Failed);
        let m = log.render_metrics();
        assert!(
            m.contains("crank_gateway_job_seconds_bucket{workload=\"embeddings\",le=\"0.25\"} 1"),
            "{m}"
        );
        assert!(m.contains("crank_gateway_job_seconds_count{workload=\"embeddings\"} 2"));
        assert!(
            m.contains("crank_gateway_jobs_total{workload=\"embeddings\",outcome=\"failed\"} 1")
        );
        assert!(m.contains("crank_gateway_retries_total 1"));
    }
}
