// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the QEMU guest tests share: the harness directory, its one-time
//! setup and a disk image with known content.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

/// `integration/qemu`: the guest harness scripts.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu")
}

/// Runs `integration/qemu/setup.sh` once per test process: it installs
/// QEMU, busybox and the guest kernel when they are missing (idempotent),
/// so a guest test also works on its own. Panics if it fails: guest tests
/// never skip.
pub fn setup() {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        let out = Command::new(dir().join("setup.sh"))
            .output()
            .expect("run integration/qemu/setup.sh");
        assert!(
            out.status.success(),
            "setup.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Writes a sparse image of `size` bytes at `path` whose first MiB holds
/// known pseudo-random bytes; returns that MiB.
pub fn write_known_image(path: &Path, size: u64) -> Vec<u8> {
    let mut first = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in first.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(path, &first).expect("write image");
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size))
        .expect("size image");
    first
}
