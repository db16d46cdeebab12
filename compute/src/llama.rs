//! llama.cpp through `llama-cpp-2`: one model loaded once and shared, a
//! context per job. Embeddings come back L2-normalised (llama.cpp returns
//! mean-pooled, unnormalised vectors); completions sample greedily, token by
//! token, in the model's own chat format ([`chat`]), and end at its turn
//! markers.

pub mod chat;

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use chat::{ChatFormat, StopScanner};

/// Why a job could not run. Input errors are the caller's (4xx); the rest
/// are the engine's.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("input is empty")]
    EmptyInput,
    #[error("input {index} has {tokens} tokens; this model takes at most {limit}")]
    InputTooLong {
        index: usize,
        tokens: usize,
        limit: usize,
    },
    #[error("{count} inputs; one request takes at most {limit}")]
    TooManyInputs { count: usize, limit: usize },
    #[error("the inputs come to more than {limit} tokens; split them over several requests")]
    TooManyTokens { limit: usize },
    #[error(
        "prompt of {prompt} tokens plus {max_tokens} to generate exceeds the context of {context}"
    )]
    ContextExceeded {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("loading model {path}: {message}")]
    Load { path: String, message: String },
    #[error("llama.cpp: {0}")]
    Engine(String),
}

impl ComputeError {
    /// True when the request, not the engine, is at fault.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            ComputeError::EmptyInput
                | ComputeError::InputTooLong { .. }
                | ComputeError::TooManyInputs { .. }
                | ComputeError::TooManyTokens { .. }
                | ComputeError::ContextExceeded { .. }
        )
    }
}

fn engine(e: impl std::fmt::Display) -> ComputeError {
    ComputeError::Engine(e.to_string())
}

/// The llama.cpp backend, initialised once per process with its logging off.
fn backend() -> Result<&'static LlamaBackend, ComputeError> {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    // llama.cpp refuses a second initialisation: one thread at a time here.
    let _init = INIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    let mut b = LlamaBackend::init().map_err(engine)?;
    b.void_logs();
    Ok(BACKEND.get_or_init(|| b))
}

fn load(path: &Path) -> Result<LlamaModel, ComputeError> {
    LlamaModel::load_from_file(backend()?, path, &LlamaModelParams::default()).map_err(|e| {
        ComputeError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    })
}

static THREADS: AtomicI32 = AtomicI32::new(0);

/// Sets the threads llama.cpp uses for contexts made from now on (the
/// embedding worker makes its one context when it starts).
pub fn set_threads(n: usize) {
    THREADS.store(
        i32::try_from(n.max(1)).unwrap_or(i32::MAX),
        Ordering::Relaxed,
    );
}

/// Threads llama.cpp uses per job: `CRANK_LLAMA_THREADS`, else what
/// [`set_threads`] said, else one per core.
pub fn threads() -> i32 {
    std::env::var("CRANK_LLAMA_THREADS")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|n| *n > 0)
        .or_else(|| Some(THREADS.load(Ordering::Relaxed)).filter(|n| *n > 0))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as i32))
}

/// L2-normalises `v` (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// The checks on embeddings inputs that need no model: some inputs, none
/// blank, at most [`MAX_INPUTS`] of them.
pub fn check_inputs(inputs: &[String]) -> Result<(), ComputeError> {
    if inputs.len() > MAX_INPUTS {
        return Err(ComputeError::TooManyInputs {
            count: inputs.len(),
            limit: MAX_INPUTS,
        });
    }
    if inputs.is_empty() || inputs.iter().any(|s| s.trim().is_empty()) {
        return Err(ComputeError::EmptyInput);
    }
    Ok(())
}

/// Whether a prompt of `prompt` tokens leaves room for `max_tokens` more in
/// a context of `context`, in arithmetic that cannot overflow.
pub fn check_room(prompt: usize, max_tokens: usize, context: usize) -> Result<(), ComputeError> {
    if max_tokens > context.saturating_sub(prompt) || prompt > context {
        return Err(ComputeError::ContextExceeded {
            prompt,
            max_tokens,
            context,
        });
    }
    Ok(())
}

/// Vectors for a batch of inputs, and the tokens they used.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
}

pub struct Embedder {
    model: LlamaModel,
    /// Most tokens one input may have (the model's trained context).
    max_tokens: usize,
    /// Most tokens one decode takes, over all its sequences.
    batch_tokens: usize,
}

/// Most inputs embedded in one decode. A power of two: llama.cpp reserves
/// its graph for `batch_tokens / MAX_SEQS` tokens per sequence and must not
/// round.
pub const MAX_SEQS: usize = 32;

/// Most inputs one embeddings request may carry (OpenAI's limit too).
pub const MAX_INPUTS: usize = 2048;

/// Most tokens one embeddings request may carry over all its inputs: the
/// work of one request (some 64 full decodes of a 512-token model) stays
/// in seconds, not minutes.
pub const MAX_REQUEST_TOKENS: usize = 32_768;

impl Embedder {
    pub fn load(path: &Path) -> Result<Self, ComputeError> {
        let model = load(path)?;
        let max_tokens = model.n_ctx_train() as usize;
        // Encoder models need every sequence whole in one micro-batch.
        let batch_tokens = max_tokens.next_multiple_of(256);
        Ok(Embedder {
            model,
            max_tokens,
            batch_tokens,
        })
    }

    pub fn dimensions(&self) -> usize {
        self.model.n_embd() as usize
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Most tokens one decode takes, over all its inputs.
    pub fn batch_tokens(&self) -> usize {
        self.batch_tokens
    }

    /// Tokenises `inputs`, refusing empty ones, ones too long, more than
    /// [`MAX_INPUTS`] of them, and more than [`MAX_REQUEST_TOKENS`] in all
    /// (stopping as soon as the total is over). Blocking work: call it off
    /// the async workers.
    pub fn tokenize(&self, inputs: &[String]) -> Result<Vec<Vec<LlamaToken>>, ComputeError> {
        check_inputs(inputs)?;
        let vocab = self.model.vocab();
        let mut total = 0usize;
        let mut tokenized = Vec::with_capacity(inputs.len());
        for (index, s) in inputs.iter().enumerate() {
            let t = vocab.tokenize(s.as_bytes(), true, false);
            if t.len() > self.max_tokens {
                return Err(ComputeError::InputTooLong {
                    index,
                    tokens: t.len(),
                    limit: self.max_tokens,
                });
            }
            total = total.saturating_add(t.len());
            if total > MAX_REQUEST_TOKENS {
                return Err(ComputeError::TooManyTokens {
                    limit: MAX_REQUEST_TOKENS,
                });
            }
            tokenized.push(t);
        }
        Ok(tokenized)
    }

    /// A context for [`Embedder::decode`]; keep it for the next call.
    pub fn context(&self) -> Result<LlamaContext<'_>, ComputeError> {
        let n = u32::try_from(self.batch_tokens).map_err(engine)?;
        let params = LlamaContextParams::default()
            .with_embeddings(true)
            .with_n_ctx(NonZeroU32::new(n))
            .with_n_batch(n)
            .with_n_ubatch(n)
            .with_n_seq_max(MAX_SEQS as u32)
            .with_n_threads(threads())
            .with_n_threads_batch(threads());
        self.model.new_context(backend()?, params).map_err(engine)
    }

    /// Unit vectors for tokenised inputs, as many sequences per decode as
    /// fit in the batch.
    pub fn decode(
        &self,
        ctx: &mut LlamaContext<'_>,
        seqs: &[&[LlamaToken]],
    ) -> Result<Vec<Vec<f32>>, ComputeError> {
        let mut vectors = Vec::with_capacity(seqs.len());
        let mut batch = LlamaBatch::new(self.batch_tokens, MAX_SEQS as i32);
        let mut rest = seqs;
        while !rest.is_empty() {
            let mut taken = 0;
            let mut tokens = 0;
            while taken < rest.len()
                && taken < MAX_SEQS
                && tokens + rest[taken].len() <= self.batch_tokens
            {
                tokens += rest[taken].len();
                taken += 1;
            }
            let (now, later) = rest.split_at(taken.max(1));
            batch.clear();
            for (i, t) in now.iter().enumerate() {
                batch.add_sequence(t, i as i32, true).map_err(engine)?;
            }
            ctx.clear_kv_cache();
            ctx.decode(&mut batch).map_err(engine)?;
            for i in 0..now.len() {
                let mut v = ctx.embeddings_seq_ith(i as i32).map_err(engine)?.to_vec();
                normalize(&mut v);
                vectors.push(v);
            }
            rest = later;
        }
        Ok(vectors)
    }

    /// Embeds `inputs` on a fresh context (the server batches concurrent
    /// requests on one kept context instead: [`crate::EmbedBatcher`]).
    pub fn embed(&self, inputs: &[String]) -> Result<Embeddings, ComputeError> {
        let tokenized = self.tokenize(inputs)?;
        let mut ctx = self.context()?;
        let seqs: Vec<&[LlamaToken]> = tokenized.iter().map(Vec::as_slice).collect();
        let vectors = self.decode(&mut ctx, &seqs)?;
        Ok(Embeddings {
            vectors,
            prompt_tokens: tokenized.iter().map(Vec::len).sum(),
        })
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The receiver of the tokens went away.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish: FinishReason,
}

pub struct Generator {
    model: LlamaModel,
    context: u32,
    format: ChatFormat,
}

impl Generator {
    /// Loads a chat model; each job gets a context of `context` tokens.
    pub fn load(path: &Path, context: u32) -> Result<Self, ComputeError> {
        let model = load(path)?;
        let context = context.min(model.n_ctx_train().max(1));
        let format = ChatFormat::of(&model)?;
        tracing::debug!(template = ?format.source(), stops = ?format.stops(), "chat format");
        Ok(Generator {
            model,
            context,
            format,
        })
    }

    /// The model's chat template and the markers that end its turn.
    pub fn chat_format(&self) -> &ChatFormat {
        &self.format
    }

    /// Renders chat messages (role, content) into a prompt in the model's
    /// chat format.
    pub fn chat_prompt(&self, messages: &[(String, String)]) -> Result<String, ComputeError> {
        self.format.prompt(&self.model, messages)
    }

    /// Generates up to `max_tokens` after `prompt`, greedily, handing each
    /// piece of text to `on_text` as it comes; `on_text` returning false stops.
    /// The turn ends at an end-of-generation token or at one of the chat
    /// format's markers, which is not part of the text.
    pub fn complete(
        &self,
        prompt: &str,
        max_tokens: usize,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Completion, ComputeError> {
        if prompt.is_empty() {
            return Err(ComputeError::EmptyInput);
        }
        let vocab = self.model.vocab();
        let tokens = vocab.tokenize(prompt.as_bytes(), true, true);
        let context = self.context as usize;
        check_room(tokens.len(), max_tokens, context)?;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.context))
            .with_n_batch(self.context)
            .with_n_threads(threads())
            .with_n_threads_batch(threads());
        let mut ctx = self.model.new_context(backend()?, params).map_err(engine)?;
        let mut batch = LlamaBatch::new(context, 1);
        batch.add_sequence(&tokens, 0, false).map_err(engine)?;
        ctx.decode(&mut batch).map_err(engine)?;
        let mut sampler = LlamaSampler::greedy();
        let mut decoder = utf8_pieces::Utf8Pieces::default();
        let mut scanner = StopScanner::new(self.format.stops());
        let mut text = String::new();
        let mut produced = 0;
        let mut pos = tokens.len() as i32;
        let finish = loop {
            if produced == max_tokens {
                break FinishReason::Length;
            }
            let token = sampler.sample(&ctx, batch.n_tokens() - 1);
            sampler.accept(token);
            if vocab.is_eog(token) {
                break FinishReason::Stop;
            }
            produced += 1;
            let scanned = if vocab.is_control(token) {
                let name = vocab.token_to_piece(token, true, None);
                scanner.push_control(&String::from_utf8_lossy(&name))
            } else {
                scanner.push(&decoder.push(&vocab.token_to_piece(token, false, None)))
            };
            if !scanned.text.is_empty() {
                text.push_str(&scanned.text);
                if !on_text(&scanned.text) {
                    break FinishReason::Cancelled;
                }
            }
            if scanned.stopped {
                break FinishReason::Stop;
            }
            batch.clear();
            batch.add(token, pos, &[0], true).map_err(engine)?;
            pos += 1;
            ctx.decode(&mut batch).map_err(engine)?;
        };
        if finish != FinishReason::Cancelled {
            // Held back as a possible marker, the turn ended before it became one.
            let rest = scanner.finish();
            if !rest.is_empty() {
                text.push_str(&rest);
                on_text(&rest);
            }
        }
        Ok(Completion {
            text,
            prompt_tokens: tokens.len(),
            completion_tokens: produced,
            finish,
        })
    }
}

/// Turns a stream of byte pieces into valid UTF-8 text, holding back a
/// character split across pieces until it is whole.
mod utf8_pieces {
    #[derive(Default)]
    pub struct Utf8Pieces {
        pending: Vec<u8>,
    }

    impl Utf8Pieces {
        pub fn push(&mut self, bytes: &[u8]) -> String {
            self.pending.extend_from_slice(bytes);
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    let out = s.to_owned();
                    self.pending.clear();
                    out
                }
                Err(e) if e.error_len().is_none() => {
                    // An incomplete character at the end: keep it for later.
                    let valid = e.valid_up_to();
                    let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                    self.pending.drain(..valid);
                    out
                }
                Err(_) => {
                    let out = String::from_utf8_lossy(&self.pending).into_owned();
                    self.pending.clear();
                    out
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn characters_split_across_pieces_come_out_whole() {
            let mut d = Utf8Pieces::default();
            let euro = "€".as_bytes();
            assert_eq!(d.push(&euro[..1]), "");
            assert_eq!(d.push(&euro[1..]), "€");
            assert_eq!(d.push(b"ok"), "ok");
            assert_eq!(d.push(&[0xff]), "\u{fffd}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_checks_cannot_overflow() {
        // `prompt + max_tokens` overflowed here: a panic in debug builds, a
        // wrap to a small number (and a job that ran) in release ones.
        assert!(matches!(
            check_room(5, usize::MAX, 2048),
            Err(ComputeError::ContextExceeded { .. })
        ));
        assert!(check_room(5, usize::MAX - 4, 2048).is_err());
        assert!(check_room(3000, 1, 2048).is_err());
        assert!(check_room(2047, 1, 2048).is_ok());
        assert!(check_room(2047, 2, 2048).is_err());
    }

    #[test]
    fn too_many_inputs_are_refused_before_any_tokenising() {
        let many = vec!["a".to_owned(); MAX_INPUTS + 1];
        assert!(matches!(
            check_inputs(&many),
            Err(ComputeError::TooManyInputs { count, limit: MAX_INPUTS }) if count == MAX_INPUTS + 1
        ));
        assert!(check_inputs(&many[..MAX_INPUTS]).is_ok());
        assert!(matches!(check_inputs(&[]), Err(ComputeError::EmptyInput)));
        assert!(matches!(
            check_inputs(&["x".into(), " ".into()]),
            Err(ComputeError::EmptyInput)
        ));
    }
}
