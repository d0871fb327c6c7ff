// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The entry points of the fuzz targets (issue 12), one `fuzz_*` function
//! per decoder that reads what a guest, a VMM or a file gives it.
//!
//! The cargo-fuzz project in `integration/fuzz/` calls each function from
//! one libFuzzer target of the same name; the stable test
//! `tests/fuzz_corpus.rs` feeds every file of every committed corpus
//! (`integration/fuzz/corpus/<target>/`) through the same function, so CI
//! replays the corpora without cargo-fuzz or a nightly toolchain. A
//! function panics only on a bug: a decoder that panics, hangs (each
//! function bounds its waits) or breaks an invariant the function checks.
//! `integration/docs/FUZZING.md` gives each input's layout and the results.
//!
//! Built with the `fuzzing` feature (it enables the devices' mock guest).

use std::time::{Duration, Instant};

mod chain;
mod stream;
mod text;

pub use chain::{fuzz_blk_request, fuzz_virtio_chain};
pub use stream::fuzz_vhost_user_stream;
pub use text::{fuzz_control_line, fuzz_log_reader, fuzz_topology};

/// A fuzz target's entry point.
pub type Entry = fn(&[u8]);

/// Every target: its name (the cargo-fuzz target and corpus folder) and
/// its entry point.
pub const TARGETS: [(&str, Entry); 6] = [
    ("virtio_chain", fuzz_virtio_chain),
    ("blk_request", fuzz_blk_request),
    ("vhost_user_stream", fuzz_vhost_user_stream),
    ("topology", fuzz_topology),
    ("control_line", fuzz_control_line),
    ("log_reader", fuzz_log_reader),
];

/// Whether a thread named `name` runs in this process.
fn thread_named(name: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    tasks.filter_map(|t| t.ok()).any(|t| {
        std::fs::read_to_string(t.path().join("comm")).is_ok_and(|comm| comm.trim_end() == name)
    })
}

/// Waits until no thread named `name` runs in this process; panics if one
/// still does after `limit`. For the threads that the code under test
/// leaves to end on their own after an input: one that ended during the
/// next input was reported by LeakSanitizer (which libFuzzer runs between
/// inputs) as leaking its memory, so every input waits for its threads.
pub(crate) fn wait_for_threads_named(name: &str, limit: Duration) {
    let start = Instant::now();
    while thread_named(name) {
        assert!(
            start.elapsed() < limit,
            "a thread named {name} still runs after {limit:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}
