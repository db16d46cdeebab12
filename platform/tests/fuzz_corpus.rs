//! Every committed seed and finding of the fuzz targets in `platform/fuzz`
//! replayed through the same code, on the stable toolchain.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        run(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n > 0, "no corpus in {}", dir.display());
}

#[test]
fn map_message_corpus() {
    replay("map_message", platform::fuzzing::map_message);
}

#[test]
fn signed_frame_corpus() {
    replay("signed_frame", platform::fuzzing::signed_frame);
}

#[test]
fn deltas_corpus() {
    replay("deltas", platform::fuzzing::deltas);
}
