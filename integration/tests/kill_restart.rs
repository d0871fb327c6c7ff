// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A backend restart loses no guest I/O (issue 12), with QEMU 7.2 and a
//! Linux guest: `integration/qemu/kill-restart.sh` runs fio random writes
//! with crc32c verification at queue depth 32 on a switchboard disk whose
//! file I/O is slowed (`--test-latency-ms`, so requests are always in
//! flight and complete out of order; `--test-slow-every 16`, so that every
//! 16th file operation is held ten times as long and a kill always finds
//! later requests completed before an earlier one), and then checks the
//! image on the host with fio's `--verify_only`.
//!
//! The tests run one at a time (`GUESTS`): three TCG guests sharing two
//! CPUs keep few requests in flight, and the control run could then
//! survive by luck.
//!
//! - `serve blk` is killed with SIGKILL three times and restarted: the
//!   guest sees 0 I/O errors, fio's verify passes, the image holds what fio
//!   wrote, and every restart resubmitted requests that were in flight,
//!   some of them held while later ones completed (`out_of_ring_order`).
//! - The same run without in-flight tracking (the control): the guest's
//!   I/O breaks (the kernel's `is not a head` and I/O errors, or fio
//!   hanging), which shows the test can fail.
//! - The blk handler panics once mid-run: the supervisor restarts the
//!   device in the process, QEMU reconnects, the guest sees 0 I/O errors,
//!   and the run's message log (`failed`, the fresh `added`, `resubmit`)
//!   replays with 0 divergences.
//!
//! A fault that panics on every request stopping at the restart limit,
//! with the reason in `query-devices`, is `restart.rs`.

use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use switchboard_integration::qemu::{self, setup};
use switchboard_integration::{output_text, switchboard_bin};

/// Held by each test for its guest's run: one guest at a time.
static GUESTS: Mutex<()> = Mutex::new(());

fn one_guest_at_a_time() -> MutexGuard<'static, ()> {
    // A test that failed while holding it says nothing about the next.
    GUESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs kill-restart.sh; returns its summary line, and all its output.
fn kill_restart(dir: &Path, args: &[&str]) -> (String, String, bool) {
    let out = Command::new(qemu::dir().join("kill-restart.sh"))
        .arg("--bin")
        .arg(switchboard_bin())
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run kill-restart.sh");
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = all
        .lines()
        .find(|l| l.starts_with("kill-restart: backend="))
        .unwrap_or_else(|| panic!("no summary line ({:?}):\n{all}", out.status))
        .to_string();
    (summary, all, out.status.success())
}

/// Every backend log of the run, with colour codes taken out.
fn backend_logs(dir: &Path) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(dir).expect("read the run's directory") {
        let p = e.expect("directory entry").path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("backend.") {
            all.push_str(&std::fs::read_to_string(&p).expect("read a backend log"));
        }
    }
    let mut plain = String::with_capacity(all.len());
    let mut chars = all.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

#[test]
fn test_guest_io_survives_three_sigkills_of_serve_blk_with_nothing_lost() {
    setup();
    let _guest = one_guest_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let (summary, all, ok) = kill_restart(dir.path(), &["--backend", "ours", "--kills", "3"]);
    assert!(ok, "{summary}\n{all}");
    for want in [
        "kills=3 ",
        "guest_ok=1",
        "io_errors=0",
        "fio_rc=0",
        "host_verify=ok",
    ] {
        assert!(summary.contains(want), "{want} not in: {summary}\n{all}");
    }
    // Each restart found requests in flight and resubmitted them: the
    // test ran what it claims to.
    let logs = backend_logs(dir.path());
    let recoveries: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("in-flight requests recovered"))
        .collect();
    assert_eq!(recoveries.len(), 3, "one recovery per restart:\n{logs}");
    for r in &recoveries {
        assert!(
            r.contains("resubmit=[") && !r.contains("resubmit=[]"),
            "a restart with nothing to resubmit: {r}"
        );
        // And found requests completed out of ring order: what the
        // control run, restored from the used index, gets wrong.
        let n = r
            .split("out_of_ring_order=Some(")
            .nth(1)
            .and_then(|t| t.split(')').next())
            .and_then(|t| t.parse::<u32>().ok());
        assert!(
            n.is_some_and(|n| n > 0),
            "a restart with every request completed in ring order: {r}"
        );
    }
}

#[test]
fn test_without_inflight_tracking_the_same_kills_break_the_guests_io() {
    setup();
    let _guest = one_guest_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let (summary, all, ok) = kill_restart(
        dir.path(),
        &[
            "--backend",
            "ours-no-inflight",
            "--kills",
            "3",
            "--timeout",
            "90",
        ],
    );
    assert!(!ok, "the control run passed: {summary}\n{all}");
    // Broken shows as `is not a head` and I/O errors from the guest's
    // kernel, or as fio hanging until the guest's timeout.
    assert!(summary.contains("guest_ok=0"), "{summary}\n{all}");
}

#[test]
fn test_a_blk_handler_panicking_once_is_restarted_and_the_guest_sees_no_error() {
    setup();
    let _guest = one_guest_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("rec.log");
    let (summary, all, ok) = kill_restart(
        dir.path(),
        &[
            "--backend",
            "ours",
            "--panic-at",
            "2000",
            "--record",
            log.to_str().expect("utf-8 path"),
        ],
    );
    assert!(ok, "{summary}\n{all}");
    for want in ["restarts=1 ", "guest_ok=1", "io_errors=0", "host_verify=ok"] {
        assert!(summary.contains(want), "{want} not in: {summary}\n{all}");
    }
    let logs = backend_logs(dir.path());
    assert!(
        logs.contains("test fault: virtio-blk request 2000 panics"),
        "{logs}"
    );
    assert!(logs.contains("in-flight requests recovered"), "{logs}");
    // The log, recorded across the restart, replays: the failure, the
    // fresh instance and the resubmitted requests included.
    let out = Command::new(switchboard_bin())
        .arg("replay")
        .arg(&log)
        .output()
        .expect("run replay");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(" 0 divergences"), "{text}");
    assert!(
        text.contains("blk0 failed at seq ") && text.contains("request 2000 panics"),
        "{text}"
    );
    let listed = Command::new(switchboard_bin())
        .arg("log")
        .arg(&log)
        .output()
        .expect("run log");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(" resubmit "),
        "no resubmit record:\n{listed}"
    );
}
