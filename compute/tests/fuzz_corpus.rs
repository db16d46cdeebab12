//! Replays the committed seed corpus of every fuzz target in
//! `compute/fuzz` through the target's body, on the stable toolchain: what
//! once decoded (or was refused) safely still does.

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let replayed = std::panic::catch_unwind(|| body(&data));
        assert!(replayed.is_ok(), "{} failed", path.display());
        files += 1;
    }
    assert!(files > 0, "no seeds in {}", dir.display());
}

#[test]
fn embeddings_body_corpus() {
    replay("embeddings_body", compute::requests::fuzz_embeddings_body);
}

#[test]
fn chat_body_corpus() {
    replay("chat_body", compute::requests::fuzz_chat_body);
}
