//! Embeddings batched across concurrent requests: one worker thread keeps
//! one llama.cpp context; requests that arrive while it decodes are taken
//! together into the next decode (up to [`MAX_SEQS`] inputs and the batch's
//! tokens), so many small requests cost few decodes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use llama_cpp_2::token::LlamaToken;
use tokio::sync::oneshot;

use crate::llama::{ComputeError, Embedder, Embeddings, MAX_SEQS};

struct Job {
    seqs: Vec<Vec<LlamaToken>>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, ComputeError>>,
}

/// The queue in front of the embedding worker. Dropping the last handle
/// ends the worker.
pub struct EmbedBatcher {
    embedder: Arc<Embedder>,
    jobs: mpsc::Sender<Job>,
    /// Decodes run so far (each serving one or more requests).
    decodes: Arc<AtomicU64>,
}

impl EmbedBatcher {
    /// Starts the worker; its context is made before this returns, so a
    /// model that cannot run fails here rather than on the first request.
    pub fn start(embedder: Arc<Embedder>) -> Result<Self, ComputeError> {
        let (jobs, rx) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let decodes = Arc::new(AtomicU64::new(0));
        let (worker, counter) = (embedder.clone(), decodes.clone());
        std::thread::Builder::new()
            .name("embed-batcher".into())
            .spawn(move || run(&worker, rx, ready_tx, &counter))
            .map_err(|e| ComputeError::Engine(e.to_string()))?;
        ready
            .recv()
            .map_err(|_| ComputeError::Engine("embedding worker ended".into()))??;
        Ok(EmbedBatcher {
            embedder,
            jobs,
            decodes,
        })
    }

    /// Decodes run so far; fewer than requests when batching worked.
    pub fn decodes(&self) -> u64 {
        self.decodes.load(Ordering::Relaxed)
    }

    /// Embeds `inputs` together with whatever else is waiting.
    pub async fn embed(&self, inputs: &[String]) -> Result<Embeddings, ComputeError> {
        let seqs = self.embedder.tokenize(inputs)?;
        let prompt_tokens = seqs.iter().map(Vec::len).sum();
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { seqs, reply })
            .map_err(|_| ComputeError::Engine("embedding worker ended".into()))?;
        let vectors = answer
            .await
            .map_err(|_| ComputeError::Engine("embedding worker ended".into()))??;
        Ok(Embeddings {
            vectors,
            prompt_tokens,
        })
    }
}

fn run(
    embedder: &Embedder,
    jobs: mpsc::Receiver<Job>,
    ready: mpsc::Sender<Result<(), ComputeError>>,
    decodes: &AtomicU64,
) {
    let mut ctx = match embedder.context() {
        Ok(c) => {
            let _ = ready.send(Ok(()));
            c
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut carried: Option<Job> = None;
    loop {
        let Some(first) = carried.take().or_else(|| jobs.recv().ok()) else {
            return;
        };
        let mut group = vec![first];
        let (mut seqs, mut tokens) = size(&group[0]);
        while let Ok(job) = jobs.try_recv() {
            let (s, t) = size(&job);
            if seqs + s > MAX_SEQS || tokens + t > embedder.batch_tokens() {
                carried = Some(job);
                break;
            }
            seqs += s;
            tokens += t;
            group.push(job);
        }
        let all: Vec<&[LlamaToken]> = group
            .iter()
            .flat_map(|j| j.seqs.iter().map(Vec::as_slice))
            .collect();
        decodes.fetch_add(1, Ordering::Relaxed);
        match embedder.decode(&mut ctx, &all) {
            Ok(vectors) => {
                let mut vectors = vectors.into_iter();
                for job in group {
                    let mine = vectors.by_ref().take(job.seqs.len()).collect();
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for job in group {
                    let _ = job.reply.send(Err(ComputeError::Engine(message.clone())));
                }
            }
        }
    }
}

fn size(job: &Job) -> (usize, usize) {
    (job.seqs.len(), job.seqs.iter().map(Vec::len).sum())
}
