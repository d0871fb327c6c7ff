// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard run` and `switchboard ctl` as an operator uses them: every
//! example starts, the control socket lists, adds and removes devices and
//! survives bad requests, SIGTERM drains and exits 0, and a topology of
//! 1,000 devices starts in one process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn switchboard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join("examples")
        .join("topologies")
}

/// A running `switchboard run`; killed if the test fails.
struct Run {
    child: Child,
    stdout: Vec<String>,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `switchboard run FILE ARGS` and waits for its "devices running" line.
fn start(file: &Path, args: &[&str]) -> Run {
    let mut child = switchboard()
        .arg("run")
        .arg(file)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start switchboard run");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = crossbeam_channel::unbounded();
    thread::spawn(move || {
        // Keeps reading after the test stops listening, so the process
        // never writes to a closed pipe.
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut stdout = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains("devices running");
                stdout.push(line);
                if done {
                    break;
                }
            }
            Err(_) => panic!(
                "no 'devices running' line; stdout so far:\n{}",
                stdout.join("\n")
            ),
        }
    }
    Run { child, stdout }
}

fn ctl(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let out = switchboard()
        .arg("ctl")
        .arg(socket)
        .args(args)
        .output()
        .expect("run switchboard ctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn terminate(run: &mut Run) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(run.child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    run.child.wait().expect("wait")
}

#[test]
fn test_every_example_starts_and_stops_on_sigterm() {
    for name in ["blk-rng.json", "disks.json", "mmio-pio.json"] {
        let dir = tempfile::tempdir().expect("tempdir");
        for e in std::fs::read_dir(examples()).expect("examples") {
            let e = e.expect("entry");
            std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
        }
        let file = dir.path().join(name);
        let ctl_sock = dir.path().join("ctl.sock");
        let mut run = start(
            &file,
            &[
                "--create-images",
                "16M",
                "--control",
                ctl_sock.to_str().expect("utf-8"),
            ],
        );
        let text: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
        let ids: Vec<&str> = text["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .map(|d| d["id"].as_str().expect("id"))
            .collect();
        let (ok, out, err) = ctl(&ctl_sock, &["query-devices"]);
        assert!(ok, "{name}: {err}");
        for id in &ids {
            let line = out
                .lines()
                .find(|l| l.split_whitespace().next() == Some(id))
                .unwrap_or_else(|| panic!("{name}: {id} not listed:\n{out}"));
            assert!(line.contains("running"), "{name}: {line}");
        }
        assert!(
            run.stdout.iter().any(|l| l.contains(&format!(
                "{} of {} devices running",
                ids.len(),
                ids.len()
            ))),
            "{name}: {:?}",
            run.stdout
        );
        let status = terminate(&mut run);
        assert!(status.success(), "{name}: exit {status:?}");
        assert!(!ctl_sock.exists(), "{name}: control socket left behind");
        for e in std::fs::read_dir(dir.path()).expect("dir") {
            let p = e.expect("entry").path();
            assert!(
                p.extension().is_none_or(|x| x != "sock"),
                "{name}: socket {} left behind",
                p.display()
            );
        }
    }
}

#[test]
fn test_control_socket_adds_and_removes_devices_and_survives_bad_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("t.json");
    std::fs::write(
        &file,
        r#"{ "buses": [ { "id": "mmio0", "kind": "mmio" } ],
             "devices": [
               { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock" } },
               { "id": "t0", "kind": "test-device", "bus": "mmio0", "addr": "0x1000" } ] }"#,
    )
    .expect("write");
    let sock = dir.path().join("ctl.sock");
    let mut run = start(&file, &["--control", sock.to_str().expect("utf-8")]);

    // Bad requests: an error reply each, and the process stays up.
    for (args, want) in [
        (vec!["no-such-command"], "CommandNotFound"),
        (vec!["device-del", r#"{"id": "nope"}"#], "DeviceNotFound"),
        (vec!["device-del", r#"{"name": "t0"}"#], "'id'"),
        (
            vec!["device-add", r#"{"id": "x", "kind": "virtio-rng"}"#],
            "vhost_user",
        ),
        (
            vec![
                "device-add",
                r#"{"id": "t1", "kind": "test-device", "bus": "mmio0", "addr": "0x1010"}"#,
            ],
            "overlaps",
        ),
        (
            vec![
                "device-add",
                r#"{"id": "rng0", "kind": "virtio-rng", "vhost_user": {"socket": "x.sock"}}"#,
            ],
            "rng0",
        ),
    ] {
        let (ok, _, err) = ctl(&sock, &args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (ok, _, err) = ctl(&sock, &["device-add", "[1, 2]"]);
    assert!(!ok && err.contains("JSON object"), "{err}");

    // device-add, then the new device serves a vhost-user frontend's
    // first request (GET_FEATURES).
    let (ok, out, err) = ctl(
        &sock,
        &[
            "device-add",
            r#"{"id": "rng1", "kind": "virtio-rng", "vhost_user": {"socket": "rng1.sock"}}"#,
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("rng1"), "{out}");
    let mut s = std::os::unix::net::UnixStream::connect(dir.path().join("rng1.sock"))
        .expect("connect to the added device");
    use std::io::{Read, Write};
    s.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
        .expect("GET_FEATURES");
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).expect("reply");
    assert_eq!(reply[0], 1, "reply to GET_FEATURES");
    drop(s);

    let (ok, out, _) = ctl(&sock, &["query-devices"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 4, "{out}");
    let (ok, out, err) = ctl(&sock, &["--json", "device-del", r#"{"id": "t0"}"#]);
    assert!(ok, "{err}");
    let reply: serde_json::Value = serde_json::from_str(out.trim()).expect("json reply");
    assert_eq!(reply["return"]["id"], "t0");
    assert!(reply["return"]["drain_ms"].as_f64().is_some(), "{reply}");
    let (ok, out, _) = ctl(&sock, &["query-stats"]);
    assert!(ok);
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    assert_eq!(stats["devices"], 2, "{stats}");
    assert!(
        stats["resident_kib"].as_u64().is_some_and(|k| k > 0),
        "{stats}"
    );

    assert!(terminate(&mut run).success());
    assert!(!dir.path().join("rng1.sock").exists());
}

#[test]
fn test_invalid_topology_starts_nothing_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.json");
    std::fs::write(
        &file,
        r#"{ "devices": [ { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "a.sock", "queues": 2 } } ] }"#,
    )
    .expect("write");
    let out = switchboard().arg("run").arg(&file).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("devices[0].vhost_user.queues"), "{err}");
    assert!(!dir.path().join("a.sock").exists(), "a socket was created");
}

#[test]
fn test_a_thousand_devices_start_in_one_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut devices = Vec::new();
    for i in 0..500 {
        devices.push(serde_json::json!({
            "id": format!("rng{i}"), "kind": "virtio-rng",
            "vhost_user": { "socket": format!("s/rng{i}.sock") } }));
    }
    for i in 0..200 {
        devices.push(serde_json::json!({
            "id": format!("disk{i}"), "kind": "virtio-blk", "path": format!("img/disk{i}.img"),
            "vhost_user": { "socket": format!("s/disk{i}.sock") } }));
    }
    for i in 0..300u64 {
        devices.push(serde_json::json!({
            "id": format!("t{i}"), "kind": "test-device", "bus": "mmio0",
            "addr": format!("{:#x}", 0x1000_0000 + i * 0x100) }));
    }
    std::fs::create_dir(dir.path().join("s")).expect("mkdir");
    std::fs::create_dir(dir.path().join("img")).expect("mkdir");
    let file = dir.path().join("big.json");
    std::fs::write(
        &file,
        serde_json::json!({ "buses": [ { "id": "mmio0", "kind": "mmio" } ], "devices": devices })
            .to_string(),
    )
    .expect("write");
    let sock = dir.path().join("ctl.sock");
    let mut run = start(
        &file,
        &[
            "--create-images",
            "1M",
            "--control",
            sock.to_str().expect("utf-8"),
        ],
    );
    let summary = run
        .stdout
        .iter()
        .find(|l| l.contains("devices running"))
        .cloned()
        .unwrap_or_default();
    assert!(
        summary.contains("1000 of 1000 devices running"),
        "{summary}"
    );
    let (ok, out, err) = ctl(&sock, &["query-stats"]);
    assert!(ok, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats");
    assert_eq!(stats["devices"], 1000);
    // The figures BENCHMARKS.md reports (no assertion on them).
    eprintln!(
        "1000 devices: {summary}; resident {} KiB, {} threads",
        stats["resident_kib"], stats["threads"]
    );
    let (ok, out, _) = ctl(&sock, &["query-devices"]);
    assert!(ok);
    assert_eq!(
        out.lines().filter(|l| l.contains(" running ")).count(),
        1000,
        "not all running"
    );
    assert!(terminate(&mut run).success());
}
