//! Embeddings batched across concurrent requests: one worker thread keeps
//! one llama.cpp context; every decode takes inputs from all waiting
//! requests in turn (up to [`MAX_SEQS`] inputs and the batch's tokens), so
//! many small requests cost few decodes and a large one cannot hold the
//! others back. A request whose caller went away is dropped before its next
//! input is decoded.
//!
//! Tokenising runs on a blocking thread, never on an async worker; the
//! request limits ([`crate::llama::MAX_INPUTS`],
//! [`crate::llama::MAX_REQUEST_TOKENS`]) are enforced there, before any
//! decode.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::Arc;

use llama_cpp_2::token::LlamaToken;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;

use crate::llama::{ComputeError, Embedder, Embeddings, MAX_SEQS};

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, ComputeError>>;

struct Job {
    seqs: Vec<Vec<LlamaToken>>,
    reply: Reply,
}

/// Inputs tokenised and within the limits, ready for
/// [`EmbedBatcher::embed_tokens`].
pub struct Tokenized(Vec<Vec<LlamaToken>>);

impl Tokenized {
    /// Tokens over all inputs.
    pub fn len(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The queue in front of the embedding worker. Dropping the last handle
/// ends the worker.
pub struct EmbedBatcher {
    embedder: Arc<Embedder>,
    jobs: mpsc::Sender<Job>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    /// Decodes run so far (each serving one or more requests).
    decodes: Counter,
    /// Requests dropped unfinished because their caller went away.
    abandoned: Counter,
}

impl EmbedBatcher {
    /// Starts the worker; its context is made before this returns, so a
    /// model that cannot run fails here rather than on the first request.
    pub fn start(embedder: Arc<Embedder>) -> Result<Self, ComputeError> {
        let (jobs, rx) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let (worker, c) = (embedder.clone(), counters.clone());
        std::thread::Builder::new()
            .name("embed-batcher".into())
            .spawn(move || run(&worker, rx, ready_tx, &c))
            .map_err(|e| ComputeError::Engine(e.to_string()))?;
        ready
            .recv()
            .map_err(|_| ComputeError::Engine("embedding worker ended".into()))??;
        Ok(EmbedBatcher {
            embedder,
            jobs,
            counters,
        })
    }

    /// Decodes run so far; fewer than requests when batching worked.
    pub fn decodes(&self) -> u64 {
        self.counters.decodes.get()
    }

    /// Requests dropped before they were done because their caller went
    /// away (the future of [`EmbedBatcher::embed`] was dropped).
    pub fn abandoned(&self) -> u64 {
        self.counters.abandoned.get()
    }

    /// The counters behind [`EmbedBatcher::decodes`] and
    /// [`EmbedBatcher::abandoned`], for a metrics registry.
    pub(crate) fn counters(&self) -> (Counter, Counter) {
        (
            self.counters.decodes.clone(),
            self.counters.abandoned.clone(),
        )
    }

    /// Embeds `inputs` together with whatever else is waiting. Dropping
    /// the future stops the work: inputs not yet decoded never are.
    pub async fn embed(&self, inputs: Vec<String>) -> Result<Embeddings, ComputeError> {
        let tokens = self.tokenize(inputs).await?;
        self.embed_tokens(tokens).await
    }

    /// The first half of [`EmbedBatcher::embed`]: tokenises `inputs` on a
    /// blocking thread, refusing what is over the limits.
    pub async fn tokenize(&self, inputs: Vec<String>) -> Result<Tokenized, ComputeError> {
        let embedder = self.embedder.clone();
        let seqs = tokio::task::spawn_blocking(move || embedder.tokenize(&inputs))
            .await
            .map_err(|e| ComputeError::Engine(format!("tokenising: {e}")))??;
        Ok(Tokenized(seqs))
    }

    /// The second half of [`EmbedBatcher::embed`]: the vectors of inputs
    /// tokenised by [`EmbedBatcher::tokenize`].
    pub async fn embed_tokens(&self, tokens: Tokenized) -> Result<Embeddings, ComputeError> {
        let seqs = tokens.0;
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
    counters: &Counters,
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
    let mut queue = Queue::default();
    loop {
        if queue.is_empty() {
            let Ok(job) = jobs.recv() else { return };
            queue.push(job);
        }
        while let Ok(job) = jobs.try_recv() {
            queue.push(job);
        }
        let gone = queue.drop_abandoned();
        counters.abandoned.inc_by(gone);
        let plan = queue.plan(MAX_SEQS, embedder.batch_tokens());
        if plan.is_empty() {
            continue;
        }
        let seqs = queue.seqs(&plan);
        counters.decodes.inc();
        let result = embedder.decode(&mut ctx, &seqs);
        queue.settle(&plan, result);
    }
}

/// A request being served: its inputs, how many are decoded, their vectors.
struct Pending {
    job: Job,
    done: usize,
    vectors: Vec<Vec<f32>>,
}

/// The requests the worker serves, in arrival order. Pure bookkeeping, no
/// model: which inputs go into the next decode, and whose they are.
#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
}

/// One input in a decode: (request's place in the queue, input index).
type Slot = (usize, usize);

impl Queue {
    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn push(&mut self, job: Job) {
        if job.seqs.is_empty() {
            let _ = job.reply.send(Ok(Vec::new()));
            return;
        }
        self.pending.push_back(Pending {
            vectors: Vec::with_capacity(job.seqs.len()),
            job,
            done: 0,
        });
    }

    /// Forgets requests whose caller stopped listening; returns how many.
    fn drop_abandoned(&mut self) -> u64 {
        let before = self.pending.len();
        self.pending.retain(|p| !p.job.reply.is_closed());
        (before - self.pending.len()) as u64
    }

    /// The inputs of the next decode: one from each request in turn, while
    /// the decode has room for `max_seqs` inputs and `max_tokens` tokens.
    /// An input longer than `max_tokens` goes alone.
    fn plan(&self, max_seqs: usize, max_tokens: usize) -> Vec<Slot> {
        let mut plan = Vec::new();
        let mut tokens = 0;
        let mut next: Vec<usize> = self.pending.iter().map(|p| p.done).collect();
        loop {
            let mut took = false;
            for (i, p) in self.pending.iter().enumerate() {
                let Some(seq) = p.job.seqs.get(next[i]) else {
                    continue;
                };
                if plan.len() == max_seqs {
                    return plan;
                }
                if !plan.is_empty() && tokens + seq.len() > max_tokens {
                    continue;
                }
                tokens += seq.len();
                plan.push((i, next[i]));
                next[i] += 1;
                took = true;
            }
            if !took {
                return plan;
            }
        }
    }

    fn seqs(&self, plan: &[Slot]) -> Vec<&[LlamaToken]> {
        plan.iter()
            .map(|&(i, s)| self.pending[i].job.seqs[s].as_slice())
            .collect()
    }

    /// Hands the decode's vectors to their requests and answers those now
    /// complete; a failed decode fails every request that had an input in it.
    fn settle(&mut self, plan: &[Slot], result: Result<Vec<Vec<f32>>, ComputeError>) {
        let mut in_plan = vec![false; self.pending.len()];
        for &(i, _) in plan {
            in_plan[i] = true;
        }
        match result {
            Ok(vectors) => {
                // Inputs of one request sit in the plan in their order.
                for (&(i, _), v) in plan.iter().zip(vectors) {
                    let p = &mut self.pending[i];
                    p.vectors.push(v);
                    p.done += 1;
                }
                self.pending.retain_mut(|p| {
                    if p.done < p.job.seqs.len() {
                        return true;
                    }
                    let reply = std::mem::replace(&mut p.job.reply, oneshot::channel().0);
                    let _ = reply.send(Ok(std::mem::take(&mut p.vectors)));
                    false
                });
            }
            Err(e) => {
                let message = e.to_string();
                let mut i = 0;
                self.pending.retain_mut(|p| {
                    let keep = !in_plan[i];
                    i += 1;
                    if !keep {
                        let reply = std::mem::replace(&mut p.job.reply, oneshot::channel().0);
                        let _ = reply.send(Err(ComputeError::Engine(message.clone())));
                    }
                    keep
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer = oneshot::Receiver<Result<Vec<Vec<f32>>, ComputeError>>;

    /// A request of inputs with these token counts.
    fn job(lens: &[usize]) -> (Job, Answer) {
        let (reply, answer) = oneshot::channel();
        let seqs = lens.iter().map(|&n| vec![LlamaToken::new(7); n]).collect();
        (Job { seqs, reply }, answer)
    }

    /// Runs the queue to the end with a fake decode that returns each
    /// input's length as its vector; returns the plans it made.
    fn drain(q: &mut Queue, max_seqs: usize, max_tokens: usize) -> Vec<Vec<Slot>> {
        let mut plans = Vec::new();
        while !q.is_empty() {
            let plan = q.plan(max_seqs, max_tokens);
            assert!(!plan.is_empty(), "a non-empty queue always makes progress");
            let vectors = q.seqs(&plan).iter().map(|s| vec![s.len() as f32]).collect();
            q.settle(&plan, Ok(vectors));
            plans.push(plan);
        }
        plans
    }

    #[test]
    fn a_small_request_is_not_held_back_by_a_large_one() {
        let mut q = Queue::default();
        let (big, mut big_answer) = job(&[1; 1000]);
        let (small, mut small_answer) = job(&[3]);
        q.push(big);
        q.push(small);
        let first = q.plan(32, 512);
        assert!(first.contains(&(1, 0)), "first decode: {first:?}");
        let vectors = q
            .seqs(&first)
            .iter()
            .map(|s| vec![s.len() as f32])
            .collect();
        q.settle(&first, Ok(vectors));
        assert_eq!(small_answer.try_recv().unwrap().unwrap(), vec![vec![3.0]]);
        assert!(
            big_answer.try_recv().is_err(),
            "the big one is not done yet"
        );
        let rest = drain(&mut q, 32, 512);
        assert!(rest.iter().all(|p| p.len() <= 32));
        let vectors = big_answer.try_recv().unwrap().unwrap();
        assert_eq!(vectors.len(), 1000);
    }

    #[test]
    fn vectors_go_back_to_their_request_in_input_order() {
        let mut q = Queue::default();
        let (a, mut a_answer) = job(&[1, 2, 3, 4, 5]);
        let (b, mut b_answer) = job(&[10, 20]);
        q.push(a);
        q.push(b);
        let plans = drain(&mut q, 3, 100);
        assert!(plans.iter().all(|p| p.len() <= 3));
        let a: Vec<f32> = a_answer.try_recv().unwrap().unwrap().concat();
        let b: Vec<f32> = b_answer.try_recv().unwrap().unwrap().concat();
        assert_eq!(a, [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(b, [10.0, 20.0]);
    }

    #[test]
    fn decodes_stay_within_the_token_budget() {
        let mut q = Queue::default();
        let (a, _a) = job(&[300, 300, 300]);
        let (b, _b) = job(&[200, 100]);
        q.push(a);
        q.push(b);
        let plans = {
            let mut plans = Vec::new();
            while !q.is_empty() {
                let plan = q.plan(32, 512);
                let tokens: usize = q.seqs(&plan).iter().map(|s| s.len()).sum();
                assert!(tokens <= 512, "{plan:?} has {tokens} tokens");
                let vectors = q.seqs(&plan).iter().map(|_| vec![0.0]).collect();
                q.settle(&plan, Ok(vectors));
                plans.push(plan);
            }
            plans
        };
        assert_eq!(plans.iter().map(Vec::len).sum::<usize>(), 5);
    }

    #[test]
    fn a_request_whose_caller_left_is_never_decoded_further() {
        let mut q = Queue::default();
        let (gone, gone_answer) = job(&[1; 200_000]);
        let (stays, mut stays_answer) = job(&[2; 20]);
        q.push(gone);
        q.push(stays);
        let plan = q.plan(32, 512);
        let vectors = q.seqs(&plan).iter().map(|_| vec![0.0]).collect();
        q.settle(&plan, Ok(vectors));
        drop(gone_answer);
        assert_eq!(q.drop_abandoned(), 1);
        let plans = drain(&mut q, 32, 512);
        // The first decode took 16 inputs of each, in turn.
        assert_eq!(
            plans.iter().map(Vec::len).sum::<usize>(),
            4,
            "only the inputs left of the other request: {plans:?}"
        );
        assert_eq!(stays_answer.try_recv().unwrap().unwrap().len(), 20);
    }

    #[test]
    fn a_failed_decode_fails_only_the_requests_in_it() {
        let mut q = Queue::default();
        let (a, mut a_answer) = job(&[400]);
        let (b, mut b_answer) = job(&[400]);
        q.push(a);
        q.push(b);
        let plan = q.plan(32, 512);
        assert_eq!(plan, vec![(0, 0)], "both do not fit one decode");
        q.settle(&plan, Err(ComputeError::Engine("boom".into())));
        assert!(matches!(
            a_answer.try_recv().unwrap(),
            Err(ComputeError::Engine(m)) if m.contains("boom")
        ));
        drain(&mut q, 32, 512);
        assert_eq!(b_answer.try_recv().unwrap().unwrap(), vec![vec![400.0]]);
    }
}
