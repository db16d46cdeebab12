//! The real small models for the compute tests, fetched by the test command
//! (`meshd models fetch`) into `$CRANK_MODELS_DIR`, default
//! `~/.cache/crank-mesh/models`.

use std::path::PathBuf;

use compute::manifest::{spec, verified_path};

/// The checked path of manifest model `name`.
pub fn model(name: &str) -> PathBuf {
    let dir = std::env::var_os("CRANK_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/crank-mesh/models")
        });
    let spec = spec(name).expect("in the manifest");
    verified_path(&dir, spec)
        .unwrap_or_else(|e| panic!("{e}; the test command fetches the models first"))
}
