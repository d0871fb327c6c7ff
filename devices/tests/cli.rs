// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `switchboard` binary as an operator runs it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn switchboard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success());
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

#[test]
fn test_serve_rng_exits_0_on_sigterm_and_removes_its_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("rng.sock");
    let mut child = switchboard()
        .args(["serve", "rng", "--socket-path"])
        .arg(&sock)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchboard");
    wait_for("the socket", || is_socket(&sock));
    terminate(&child);
    let out = child.wait().expect("wait");
    assert!(out.success(), "exit status {out:?}");
    assert!(!sock.exists(), "socket file left behind");
    let _ = child.stderr.take();
}

#[test]
fn test_serve_rng_socket_count_serves_numbered_sockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("rng.sock");
    let mut child = switchboard()
        .args(["serve", "rng", "--socket-count", "3", "--socket-path"])
        .arg(&base)
        .stderr(Stdio::null())
        .spawn()
        .expect("start switchboard");
    for i in 0..3 {
        let p = dir.path().join(format!("rng.sock{i}"));
        wait_for("numbered sockets", || is_socket(&p));
    }
    terminate(&child);
    assert!(child.wait().expect("wait").success());
}

#[test]
fn test_serve_refuses_a_path_that_is_not_a_socket_and_leaves_it_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("precious.img");
    std::fs::write(&file, b"do not delete").expect("write");
    let out = switchboard()
        .args(["serve", "rng", "--socket-path"])
        .arg(&file)
        .output()
        .expect("run switchboard");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("precious.img") && err.contains("not a socket"),
        "stderr: {err}"
    );
    assert_eq!(std::fs::read(&file).expect("still there"), b"do not delete");
}

#[test]
fn test_serve_refuses_a_missing_directory_and_bad_numbers() {
    let out = switchboard()
        .args(["serve", "rng", "--socket-path", "/nonexistent-dir/x.sock"])
        .output()
        .expect("run switchboard");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-dir"));
    let out = switchboard()
        .args([
            "serve",
            "rng",
            "--socket-path",
            "/tmp/x.sock",
            "--rate-limit",
            "0",
        ])
        .output()
        .expect("run switchboard");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate-limit"));
}
