//! The bodies of the model requests, in OpenAI's shapes, decoded and checked
//! before any work is done for them: everything a job may ask for that can
//! be judged without a model is settled here (how many inputs, none blank,
//! the encoding asked for, a completion length of at least one token).
//! The server turns a [`RequestError`] into a 4xx; the fuzz targets in
//! `compute/fuzz` drive [`fuzz_embeddings_body`] and [`fuzz_chat_body`].

use serde::Deserialize;

use crate::llama::{check_inputs, check_room, ComputeError, MAX_INPUTS};

/// Completion length when the request names none.
pub const DEFAULT_MAX_TOKENS: usize = 128;

/// Why a request body was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("invalid JSON body: {0}")]
    Json(String),
    #[error("encoding_format {0:?}: use \"float\" or \"base64\"")]
    UnsupportedEncoding(String),
    #[error("max_tokens must be at least 1")]
    InvalidMaxTokens,
    #[error(transparent)]
    Input(#[from] ComputeError),
}

/// `input`: a string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct EmbeddingsRequest {
    model: String,
    input: Input,
    #[serde(default)]
    encoding_format: Option<String>,
}

/// An embeddings request that passed every check but the model's own.
#[derive(Debug)]
pub struct EmbeddingsJob {
    pub model: String,
    pub inputs: Vec<String>,
    /// Vectors as base64 of little-endian f32s (what OpenAI clients ask for
    /// by default) rather than JSON numbers.
    pub base64: bool,
}

impl EmbeddingsRequest {
    /// Cheap checks first: a request too big is refused before any
    /// tokenising, queueing or ticket.
    pub fn check(self) -> Result<EmbeddingsJob, RequestError> {
        let base64 = match self.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => return Err(RequestError::UnsupportedEncoding(other.to_owned())),
        };
        let inputs = match self.input {
            Input::One(s) => vec![s],
            Input::Many(v) => v,
        };
        check_inputs(&inputs)?;
        Ok(EmbeddingsJob {
            model: self.model,
            inputs,
            base64,
        })
    }
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
}

/// A chat request that passed every check but the model's own (the
/// prompt's length against the context, [`check_room`]).
#[derive(Debug)]
pub struct ChatJob {
    pub model: String,
    /// (role, content)
    pub messages: Vec<(String, String)>,
    pub stream: bool,
    pub max_tokens: usize,
}

impl ChatRequest {
    pub fn check(self) -> Result<ChatJob, RequestError> {
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 {
            return Err(RequestError::InvalidMaxTokens);
        }
        Ok(ChatJob {
            model: self.model,
            messages: self
                .messages
                .into_iter()
                .map(|m| (m.role, m.content))
                .collect(),
            stream: self.stream,
            max_tokens,
        })
    }
}

/// An embeddings body as the server decodes and checks it.
pub fn decode_embeddings(body: &[u8]) -> Result<EmbeddingsJob, RequestError> {
    serde_json::from_slice::<EmbeddingsRequest>(body)
        .map_err(|e| RequestError::Json(e.to_string()))?
        .check()
}

/// A chat body as the server decodes and checks it.
pub fn decode_chat(body: &[u8]) -> Result<ChatJob, RequestError> {
    serde_json::from_slice::<ChatRequest>(body)
        .map_err(|e| RequestError::Json(e.to_string()))?
        .check()
}

/// Fuzz target body: any bytes decode to a job within the limits or to a
/// client error, never a panic.
#[doc(hidden)]
pub fn fuzz_embeddings_body(data: &[u8]) {
    match decode_embeddings(data) {
        Ok(job) => {
            assert!((1..=MAX_INPUTS).contains(&job.inputs.len()));
            assert!(job.inputs.iter().all(|s| !s.trim().is_empty()));
        }
        Err(e) => assert_client_error(e),
    }
}

/// Fuzz target body: any bytes decode to a chat job or a client error, and
/// the context check on the job's `max_tokens` is exact for any prompt
/// length and context (no overflow).
#[doc(hidden)]
pub fn fuzz_chat_body(data: &[u8]) {
    match decode_chat(data) {
        Ok(job) => {
            assert!(job.max_tokens >= 1);
            for prompt in [0, data.len(), usize::MAX] {
                for context in [0, 1, 2048, usize::MAX] {
                    let fits = prompt as u128 + job.max_tokens as u128 <= context as u128;
                    assert_eq!(check_room(prompt, job.max_tokens, context).is_ok(), fits);
                }
            }
        }
        Err(e) => assert_client_error(e),
    }
}

fn assert_client_error(e: RequestError) {
    if let RequestError::Input(e) = &e {
        assert!(e.is_client_error(), "{e}");
    }
    assert!(!e.to_string().is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_bodies_decode_or_are_refused_precisely() {
        let job =
            decode_embeddings(br#"{"model":"m","input":"hi","encoding_format":"base64"}"#).unwrap();
        assert_eq!((job.inputs.len(), job.base64), (1, true));
        assert!(matches!(
            decode_embeddings(br#"{"model":"m","input":["a"],"encoding_format":"int8"}"#),
            Err(RequestError::UnsupportedEncoding(f)) if f == "int8"
        ));
        assert!(matches!(
            decode_embeddings(br#"{"model":"m","input":[1,2,3]}"#),
            Err(RequestError::Json(_))
        ));
        let many = format!(
            r#"{{"model":"m","input":{}}}"#,
            serde_json::json!(vec!["a"; MAX_INPUTS + 1])
        );
        assert!(matches!(
            decode_embeddings(many.as_bytes()),
            Err(RequestError::Input(ComputeError::TooManyInputs { .. }))
        ));
    }

    #[test]
    fn chat_bodies_decode_or_are_refused_precisely() {
        let job =
            decode_chat(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(job.max_tokens, DEFAULT_MAX_TOKENS);
        let job = decode_chat(
            br#"{"model":"m","messages":[],"max_tokens":5,"max_completion_tokens":18446744073709551615}"#,
        )
        .unwrap();
        assert_eq!(job.max_tokens, usize::MAX, "the newer field wins");
        assert!(matches!(
            decode_chat(br#"{"model":"m","messages":[],"max_tokens":0}"#),
            Err(RequestError::InvalidMaxTokens)
        ));
        assert!(matches!(
            decode_chat(br#"{"model":"m","messages":[],"max_tokens":-1}"#),
            Err(RequestError::Json(_))
        ));
    }
}
