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

#[test]
fn test_serve_blk_exits_0_on_sigterm_and_removes_its_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("image");
    let sock = dir.path().join("blk.sock");
    let mut child = switchboard()
        .args(["serve", "blk", "--queues", "2", "--path"])
        .arg(&image)
        .arg("--socket-path")
        .arg(&sock)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchboard");
    wait_for("the socket", || is_socket(&sock));
    terminate(&child);
    let out = child.wait().expect("wait");
    assert!(out.success(), "exit status {out:?}");
    assert!(!sock.exists(), "socket file left behind");
    assert_eq!(std::fs::metadata(&image).expect("image").len(), 1 << 20);
    let _ = child.stderr.take();
}

#[test]
fn test_serve_blk_reports_a_bad_image_or_option_and_creates_no_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("blk.sock");
    let small = dir.path().join("small.img");
    std::fs::write(&small, [0u8; 100]).expect("write");
    let image = dir.path().join("ok.img");
    std::fs::write(&image, [0u8; 4096]).expect("write");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--path".into(), "/nonexistent/disk.img".into()],
            "/nonexistent/disk.img",
        ),
        (
            vec!["--path".into(), dir.path().display().to_string()],
            "not a regular file",
        ),
        (
            vec!["--path".into(), small.display().to_string()],
            "smaller than one 512-byte sector",
        ),
        (
            vec![
                "--path".into(),
                image.display().to_string(),
                "--queue-size".into(),
                "100".into(),
            ],
            "--queue-size",
        ),
        (
            vec![
                "--path".into(),
                image.display().to_string(),
                "--serial".into(),
                "a-serial-longer-than-twenty".into(),
            ],
            "more than 20",
        ),
        (
            vec![
                "--path".into(),
                image.display().to_string(),
                "--socket-count".into(),
                "2".into(),
            ],
            "--read-only",
        ),
    ];
    for (args, want) in cases {
        let out = switchboard()
            .args(["serve", "blk"])
            .args(&args)
            .arg("--socket-path")
            .arg(&sock)
            .output()
            .expect("run switchboard");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(want),
            "{args:?}: stderr lacks {want:?}:\n{err}"
        );
        assert!(!sock.exists(), "{args:?}: a socket was created");
    }
}

#[test]
fn test_serve_takes_an_inherited_listening_socket_with_socket_fd() {
    // A parent (python, as a service manager would) binds and listens, then
    // passes the socket as fd 3 and, once switchboard took it, connects.
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("inherited.sock");
    let script = r#"
import os, socket, subprocess, sys, time
path, exe, mode = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(1)
fd = s.detach()
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
p = subprocess.Popen([exe, "serve", "rng", "--socket-fd", "3"], pass_fds=[3])
os.close(3)
try:
    if mode == "idle":
        # Nobody ever connects: SIGTERM must still end the accept.
        time.sleep(0.5)
        raise SystemExit(0)
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(10)
    c.connect(path)
    # A vhost-user GET_FEATURES request: the backend answers it.
    c.sendall((1).to_bytes(4, "little") + (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
    reply = c.recv(20)
    print("reply", len(reply))
    c.close()
    time.sleep(0.2)
finally:
    p.terminate()
    print("rc", p.wait(timeout=20))
print("exists", os.path.exists(path))
"#;
    let idle = dir.path().join("idle.sock");
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&idle)
        .arg(env!("CARGO_BIN_EXE_switchboard"))
        .arg("idle")
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("rc 0"),
        "SIGTERM with no frontend ever connected:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&sock)
        .arg(env!("CARGO_BIN_EXE_switchboard"))
        .arg("connect")
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("reply 20"),
        "no GET_FEATURES reply:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("rc 0"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("exists True"),
        "the inherited socket's file was removed: {stdout}"
    );
    assert!(
        stderr.contains("serving virtio-rng on socket fd 3"),
        "{stderr}"
    );

    let out = switchboard()
        .args(["serve", "rng", "--socket-fd", "3"])
        .output()
        .expect("run switchboard");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--socket-fd 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn test_record_refuses_an_existing_log_and_starts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("old.log");
    std::fs::write(&log, "precious\n").expect("write");
    let sock = dir.path().join("rng.sock");
    let out = switchboard()
        .args(["serve", "rng", "--socket-path"])
        .arg(&sock)
        .arg("--record")
        .arg(&log)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--record"), "{err}");
    assert!(err.contains("the file exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&log).expect("read"), "precious\n");
    assert!(!sock.exists(), "a socket was created");
}

#[test]
fn test_serve_record_writes_a_header_and_log_and_replay_read_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("image");
    let log = dir.path().join("serve.log");
    let sock = dir.path().join("blk.sock");
    let child = switchboard()
        .args(["serve", "blk", "--serial", "sn-1", "--path"])
        .arg(&image)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--record")
        .arg(&log)
        .args(["--record-data", "value"])
        // This test reads the JSON Lines form (the default is binary,
        // which `log --json` renders; record_replay.rs covers it).
        .args(["--record-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_for("the socket", || is_socket(&sock));
    terminate(&child);
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("recorded 1 records"), "{err}");
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let header = &lines[0];
    assert_eq!(header["format"], "switchboard-log");
    assert_eq!(header["version"], 1);
    assert_eq!(header["data"], "value");
    assert_eq!(header["topology"]["devices"][0]["id"], "blk0");
    assert_eq!(header["actors"][0]["id"], "blk0");
    assert_eq!(header["actors"][0]["rebuild"]["capacity"], 2048);
    assert_eq!(header["actors"][0]["rebuild"]["serial"], "sn-1");
    assert_eq!(lines[1]["type"], "added");
    assert_eq!(lines[1]["seq"], 1);

    let out = switchboard()
        .arg("replay")
        .arg(&log)
        .output()
        .expect("replay");
    assert!(out.status.success(), "{out:?}");
    let out = switchboard()
        .args(["log", "--stats"])
        .arg(&log)
        .output()
        .expect("log");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("blk0"), "{stdout}");
    assert!(stdout.contains("added"), "{stdout}");
}

#[test]
fn test_replay_and_log_refuse_what_is_not_a_log_with_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_log = dir.path().join("topology.json");
    std::fs::write(&not_log, "{\"devices\": []}\n").expect("write");
    for cmd in ["replay", "log"] {
        let out = switchboard().arg(cmd).arg(&not_log).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains("topology.json:1: not a switchboard log header"),
            "{cmd}: {err}"
        );
    }
    let out = switchboard()
        .arg("replay")
        .arg(dir.path().join("missing.log"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("missing.log"), "{err}");
}
