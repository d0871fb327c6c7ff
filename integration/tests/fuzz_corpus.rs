// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Replays every committed fuzz corpus on stable Rust (issue 12): each file
//! of `integration/fuzz/corpus/<target>/` goes through the same entry point
//! its libFuzzer target calls (`switchboard_integration::fuzzing`), so CI
//! checks without cargo-fuzz that no input the fuzzers kept, crashes
//! included once fixed, panics or hangs again. Needs the `fuzzing` feature
//! (`cargo test --workspace --all-features` has it).

use std::path::{Path, PathBuf};

use switchboard_integration::fuzzing::TARGETS;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no input", dir.display());
    files
}

fn replay(target: &str) {
    let (_, entry) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let files = corpus(target);
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        // The file's name in the panic message, should the entry panic.
        let name = file.display().to_string();
        let result = std::panic::catch_unwind(|| entry(&data));
        assert!(result.is_ok(), "{target}: {name} panicked");
    }
    println!("{target}: {} inputs replayed", files.len());
}

#[test]
fn test_every_target_has_a_corpus_and_a_cargo_fuzz_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (target, _) in TARGETS {
        let source = fuzz.join("fuzz_targets").join(format!("{target}.rs"));
        let text = std::fs::read_to_string(&source)
            .unwrap_or_else(|e| panic!("read {}: {e}", source.display()));
        assert!(
            text.contains(&format!("fuzzing::fuzz_{target}(")),
            "{} does not call fuzz_{target}",
            source.display()
        );
        assert!(!corpus(target).is_empty());
    }
}

#[test]
fn test_virtio_chain_corpus() {
    replay("virtio_chain");
}

#[test]
fn test_blk_request_corpus() {
    replay("blk_request");
}

#[test]
fn test_vhost_user_stream_corpus() {
    replay("vhost_user_stream");
}

#[test]
fn test_topology_corpus() {
    replay("topology");
}

#[test]
fn test_control_line_corpus() {
    replay("control_line");
}

#[test]
fn test_log_reader_corpus() {
    replay("log_reader");
}
