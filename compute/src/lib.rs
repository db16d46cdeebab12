//! Crank Mesh compute: llama.cpp chat and embeddings on a device's own
//! models, pinned by SHA-256 and obtained by `meshd models fetch`.
#![forbid(unsafe_code)]

pub mod admission;
pub mod batch;
pub mod fetch;
pub mod llama;
pub mod manifest;
pub mod requests;
pub mod server;

pub use batch::EmbedBatcher;
pub use llama::{Completion, ComputeError, Embedder, Embeddings, FinishReason, Generator};
pub use manifest::{ModelKind, ModelSpec, MANIFEST};
