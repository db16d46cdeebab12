//! The models a device may serve, pinned by SHA-256. A file is served only
//! when its hash matches its entry here.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Chat,
    Embedding,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// The name clients ask for (`model` in the OpenAI API).
    pub name: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    pub kind: ModelKind,
}

/// The models `meshd models fetch` obtains. One model of each kind: a
/// device serves the chat model and the embedding model it has.
pub const MANIFEST: [ModelSpec; 2] = [
    // SmolLM2-135M-Instruct (Apache-2.0), Q4_1: instruction-tuned, with its
    // ChatML template in the GGUF.
    ModelSpec {
        name: "smollm2-135m-instruct",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        kind: ModelKind::Chat,
    },
    ModelSpec {
        name: "all-minilm-l6-v2",
        file: "all-MiniLM-L6-v2-f16.gguf",
        sha256: "df28cb902a69fdbbb6e33ad51910d3ef67128f816d6a70ef28316e8aa7d8b5dd",
        size: 46_223_488,
        kind: ModelKind::Embedding,
    },
];

pub fn spec(name: &str) -> Option<&'static ModelSpec> {
    MANIFEST.iter().find(|m| m.name == name)
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: not found (run `meshd models fetch`)")]
    Missing { path: PathBuf },
    #[error("{path}: sha256 {got} does not match the manifest ({expected})")]
    Mismatch {
        path: PathBuf,
        got: String,
        expected: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// The path of `spec`'s file in `dir`, once its hash is checked.
pub fn verified_path(dir: &Path, spec: &ModelSpec) -> Result<PathBuf, VerifyError> {
    let path = dir.join(spec.file);
    if !path.is_file() {
        return Err(VerifyError::Missing { path });
    }
    let got = sha256_file(&path).map_err(|source| VerifyError::Io {
        path: path.clone(),
        source,
    })?;
    if got != spec.sha256 {
        return Err(VerifyError::Mismatch {
            path,
            got,
            expected: spec.sha256,
        });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_files_that_do_not_match() {
        let dir = std::env::temp_dir().join(format!("crank-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let minilm = &MANIFEST[1];
        assert!(matches!(
            verified_path(&dir, minilm),
            Err(VerifyError::Missing { .. })
        ));
        std::fs::write(dir.join(minilm.file), b"not a model").unwrap();
        assert!(matches!(
            verified_path(&dir, minilm),
            Err(VerifyError::Mismatch { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            spec("smollm2-135m-instruct").map(|m| m.kind),
            Some(ModelKind::Chat)
        );
        assert!(spec("nope").is_none());
    }
}
