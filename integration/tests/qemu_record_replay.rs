// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A real Linux guest's session, recorded by `switchboard run --record` and
//! replayed by `switchboard replay`.
//!
//! One guest boots under QEMU with a disk (`disk0`, virtio-blk, 2 queues)
//! and an entropy device (`rng0`, virtio-rng), both served by one
//! `switchboard run` of a topology file. The guest test `blk-rng` writes and
//! reads back the disk and reads `/dev/hwrng`; then QEMU hot-unplugs the
//! rng (QMP `device_del`, `chardev-remove`), `switchboard ctl device-del`
//! removes `rng0` from the running switchboard, QEMU plugs in an entropy
//! device of its own (the guest's sign that the host is done), and the
//! guest writes and reads the disk once more. SIGTERM ends the recording.
//! The log must hold the guest's reads, writes and entropy requests and
//! `rng0`'s removal (before the disk's last requests), and it must replay
//! with no divergence, as a whole and device by device.
//!
//! The session runs twice, one guest at a time: recorded as JSON Lines
//! (`--record-format json`) and in the binary form. The log holds hashed
//! data (`--record-data hash`, the default); `QEMU_RECORD_DATA=value`
//! records by value instead. Like `qemu_guest.rs`,
//! this test runs `integration/qemu/setup.sh` and never skips: a machine
//! without QEMU fails it. On failure the session's directory (topology,
//! image, log, serial console) is kept and its path printed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use switchboard_integration::qemu::{self, setup};
use switchboard_integration::{output_text as text, switchboard_bin};

/// Longest wait for anything the guest does (TCG boots take tens of seconds).
const GUEST_WAIT: Duration = Duration::from_secs(300);
/// Longest wait for switchboard to start or stop.
const SWITCHBOARD_WAIT: Duration = Duration::from_secs(60);

/// Lines a child writes to a pipe, collected by a thread of their own (so
/// the child never blocks on a full pipe).
struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Lines {
    fn collect(pipe: impl Read + Send + 'static) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let to = Arc::clone(&lines);
        let reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                to.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Lines {
            lines,
            reader: Some(reader),
        }
    }

    /// Waits for the end of the pipe (the child has exited): every line
    /// is in.
    fn finish(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the pipe's reader");
        }
    }

    fn text(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }
}

/// Waits up to `limit` for `child` to exit.
fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The session's processes and directory. Dropped during a panic, it
/// stops what still runs and keeps the directory for a post-mortem.
struct Session {
    dir: Option<tempfile::TempDir>,
    /// `switchboard run`.
    switchboard: Child,
    switchboard_out: Lines,
    switchboard_err: Lines,
    /// `run-guest.sh` (it takes its QEMU down when it gets SIGTERM).
    guest: Option<Child>,
}

impl Session {
    fn path(&self) -> &Path {
        self.dir.as_ref().expect("the session's directory").path()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(mut guest) = self.guest.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(guest.id().to_string())
                .status();
            if wait_for(&mut guest, Duration::from_secs(10)).is_none() {
                let _ = guest.kill();
                let _ = guest.wait();
            }
        }
        // QEMU itself, should run-guest.sh not have stopped it.
        if let Some(dir) = &self.dir {
            if let Ok(pid) = std::fs::read_to_string(dir.path().join("guest/qemu.pid")) {
                let _ = Command::new("kill")
                    .arg(pid.trim())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = self.switchboard.kill();
        let _ = self.switchboard.wait();
        if thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "switchboard run stdout:\n{}\nstderr:\n{}",
                    self.switchboard_out.text(),
                    self.switchboard_err.text()
                );
                eprintln!("session kept in {}", dir.keep().display());
            }
        }
    }
}

/// Runs `switchboard ARGS`.
fn switchboard(args: &[&str]) -> Output {
    Command::new(switchboard_bin())
        .args(args)
        .output()
        .expect("run switchboard")
}

/// Runs `qmp.py QMP_SOCKET ARGS`; asserts it succeeded.
fn qmp(socket: &Path, args: &[&str]) -> String {
    let out = Command::new(qemu::dir().join("qmp.py"))
        .arg(socket)
        .args(args)
        .output()
        .expect("run qmp.py");
    assert!(out.status.success(), "qmp.py {args:?}: {}", text(&out));
    text(&out)
}

/// The log's records, of either form, as `switchboard log --json` prints
/// them.
fn records(log: &Path) -> Vec<serde_json::Value> {
    let out = switchboard(&["log", "--json", log.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "switchboard log --json: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// One guest at a time: two TCG guests on a small machine would each take
/// twice as long.
static ONE_GUEST: Mutex<()> = Mutex::new(());

#[test]
fn test_a_qemu_guest_session_with_a_device_del_replays_with_no_divergence() {
    guest_session("json");
}

#[test]
fn test_a_qemu_guest_session_recorded_in_the_binary_form_replays_with_no_divergence() {
    guest_session("binary");
}

/// The session, recorded with `--record-format FORMAT`.
fn guest_session(format: &str) {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    setup();
    // Built before the clock starts: the times printed are the session's.
    switchboard_bin();
    let started = Instant::now();
    let data = std::env::var("QEMU_RECORD_DATA").unwrap_or_else(|_| "hash".into());
    let dir = tempfile::Builder::new()
        .prefix("qemu-record-replay.")
        .tempdir()
        .expect("tempdir");
    let image = dir.path().join("disk.img");
    qemu::write_known_image(&image, 64 << 20);
    let topology = dir.path().join("topology.json");
    std::fs::write(
        &topology,
        serde_json::json!({
            "devices": [
                { "id": "disk0", "kind": "virtio-blk", "path": "disk.img",
                  "vhost_user": { "socket": "disk0.sock", "queues": 2 } },
                { "id": "rng0", "kind": "virtio-rng",
                  "vhost_user": { "socket": "rng0.sock" } },
            ]
        })
        .to_string(),
    )
    .expect("write the topology");
    let log = dir.path().join(format!("session.{format}"));
    let control = dir.path().join("control.sock");
    let mut child = Command::new(switchboard_bin())
        .arg("run")
        .arg(&topology)
        .arg("--record")
        .arg(&log)
        .args(["--record-data", &data, "--record-format", format])
        .arg("--control")
        .arg(&control)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchboard run");
    let switchboard_out = Lines::collect(child.stdout.take().expect("stdout"));
    let switchboard_err = Lines::collect(child.stderr.take().expect("stderr"));
    let mut session = Session {
        dir: Some(dir),
        switchboard: child,
        switchboard_out,
        switchboard_err,
        guest: None,
    };
    let (disk_sock, rng_sock) = (
        session.path().join("disk0.sock"),
        session.path().join("rng0.sock"),
    );
    let deadline = Instant::now() + SWITCHBOARD_WAIT;
    while !(session
        .switchboard_out
        .text()
        .contains("2 of 2 devices running")
        && disk_sock.exists()
        && rng_sock.exists()
        && control.exists())
    {
        assert!(
            session.switchboard.try_wait().expect("wait").is_none(),
            "switchboard run exited"
        );
        assert!(Instant::now() < deadline, "switchboard run did not start");
        thread::sleep(Duration::from_millis(50));
    }

    // The guest: vu0 is the disk, vu1 the rng (run-guest.sh's ids).
    let guest_dir = session.path().join("guest");
    let guest = Command::new(qemu::dir().join("run-guest.sh"))
        .arg("--socket")
        .arg(&disk_sock)
        .args(["--device", "blk", "--dev-opts", "num-queues=2"])
        .arg("--socket")
        .arg(&rng_sock)
        .args(["--device", "rng", "--smp", "2", "--test", "blk-rng"])
        .args(["--arg", "mib=1", "--arg", "unplug=1", "--timeout", "600"])
        .arg("--dir")
        .arg(&guest_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start run-guest.sh");
    session.guest = Some(guest);
    let guest = session.guest.as_mut().expect("the guest");
    let mut guest_out = Lines::collect(guest.stdout.take().expect("stdout"));
    let mut guest_err = Lines::collect(guest.stderr.take().expect("stderr"));
    let serial = guest_dir.join("serial.log");
    let deadline = Instant::now() + GUEST_WAIT;
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("HARNESS READY")
    {
        if let Some(status) = guest.try_wait().expect("wait") {
            guest_out.finish();
            guest_err.finish();
            panic!(
                "the guest ended ({status}) before it was ready:\n{}\n{}\nserial:\n{}",
                guest_out.text(),
                guest_err.text(),
                std::fs::read_to_string(&serial).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the guest never got ready");
        thread::sleep(Duration::from_millis(200));
    }
    let booted = started.elapsed();

    // The device-del: QEMU unplugs the rng from the guest and closes its
    // connection, then switchboard removes rng0 while disk0 keeps serving.
    let qmp_sock = guest_dir.join("qmp.sock");
    qmp(
        &qmp_sock,
        &[
            "device_del",
            r#"{"id": "vu1"}"#,
            "--wait-event",
            "DEVICE_DELETED",
            "--timeout",
            "120",
        ],
    );
    qmp(&qmp_sock, &["chardev-remove", r#"{"id": "cvu1"}"#]);
    let control_str = control.to_str().expect("utf-8 path");
    let out = switchboard(&["ctl", control_str, "device-del", r#"{"id": "rng0"}"#]);
    assert!(out.status.success(), "device-del rng0: {}", text(&out));
    eprintln!("device-del rng0: {}", text(&out).replace('\n', " "));
    let out = switchboard(&["ctl", control_str, "query-devices"]);
    assert!(out.status.success(), "query-devices: {}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some("rng0")),
        "rng0 still listed:\n{listed}"
    );
    // The guest's sign to go on: an entropy device of QEMU's own (not
    // served by switchboard) on the freed root port.
    qmp(
        &qmp_sock,
        &[
            "device_add",
            r#"{"driver": "virtio-rng-pci", "id": "rng-builtin", "bus": "rp1"}"#,
        ],
    );

    let status = wait_for(guest, GUEST_WAIT).expect("the guest did not finish");
    guest_out.finish();
    guest_err.finish();
    let guest_text = format!("{}\n{}", guest_out.text(), guest_err.text());
    assert!(status.success(), "the guest test failed:\n{guest_text}");
    session.guest = None;
    eprintln!("{guest_text}");
    for name in ["blk-rw", "rng", "blk-after-unplug"] {
        assert!(
            guest_text
                .lines()
                .any(|l| l.starts_with(&format!("HARNESS RESULT name={name} ok=1"))),
            "no passing {name} result:\n{guest_text}"
        );
    }
    // Every chunk the guest wrote (before and after the unplug) is in the image.
    let out = Command::new(qemu::dir().join("check-image.sh"))
        .arg(&serial)
        .arg(&image)
        .output()
        .expect("run check-image.sh");
    assert!(out.status.success(), "check-image.sh: {}", text(&out));

    Command::new("kill")
        .arg("-TERM")
        .arg(session.switchboard.id().to_string())
        .status()
        .expect("kill -TERM switchboard run");
    let status = wait_for(&mut session.switchboard, SWITCHBOARD_WAIT)
        .expect("switchboard run did not stop on SIGTERM");
    session.switchboard_out.finish();
    session.switchboard_err.finish();
    let stderr = session.switchboard_err.text();
    assert!(status.success(), "switchboard run: {status}\n{stderr}");
    // "recorded N records (B bytes) to LOG": every record is in the log.
    let recorded: usize = stderr
        .split("recorded ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'recorded N records' line:\n{stderr}"));

    // What the log holds.
    let all = records(&log);
    assert_eq!(all.len(), recorded, "records in the log");
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for r in &all {
        let key = (
            r["to"].as_str().unwrap_or("?").to_string(),
            r["type"].as_str().unwrap_or("?").to_string(),
        );
        *counts.entry(key).or_default() += 1;
    }
    eprintln!(
        "log: {} records ({} bytes, {data} data, {format} form)",
        all.len(),
        std::fs::metadata(&log).expect("log").len()
    );
    for ((to, kind), n) in &counts {
        eprintln!("  {to:>6} {kind:<16} {n}");
    }
    let count = |to: &str, kind: &str| {
        counts
            .get(&(to.to_string(), kind.to_string()))
            .copied()
            .unwrap_or(0)
    };
    for (to, kind) in [
        ("disk0", "added"),
        ("disk0", "write"),
        ("disk0", "read"),
        ("disk0", "flush"),
        ("disk0", "SET_MEM_TABLE"),
        ("disk0", "GET_VRING_BASE"),
        ("rng0", "added"),
        ("rng0", "entropy"),
        ("rng0", "SET_MEM_TABLE"),
        ("rng0", "GET_VRING_BASE"),
    ] {
        assert!(count(to, kind) > 0, "no {kind} record to {to}");
    }
    assert_eq!(count("rng0", "removed"), 1, "rng0's removal");
    assert_eq!(count("disk0", "removed"), 1, "disk0's removal on SIGTERM");
    // rng0 went away in the middle of the session: the guest's last
    // writes and reads of the disk come after its removal record, and
    // nothing reached rng0 after it.
    let seq = |r: &serde_json::Value| r["seq"].as_u64().expect("seq");
    let removed = all
        .iter()
        .find(|r| r["to"] == "rng0" && r["type"] == "removed")
        .map(seq)
        .expect("rng0's removal");
    for kind in ["write", "read"] {
        assert!(
            all.iter()
                .any(|r| r["to"] == "disk0" && r["type"] == kind && seq(r) > removed),
            "no disk0 {kind} after rng0's removal (seq {removed})"
        );
    }
    assert!(
        !all.iter().any(|r| r["to"] == "rng0" && seq(r) > removed),
        "a record to rng0 after its removal (seq {removed})"
    );

    // The replay: the whole log, then each device alone.
    let log_str = log.to_str().expect("utf-8 path");
    let out = switchboard(&["replay", log_str, "--no-progress"]);
    let t = text(&out);
    eprintln!("switchboard replay:\n{t}");
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains(" 0 divergences"), "{t}");
    assert!(!t.contains("not replayed") && !t.contains("gaps"), "{t}");
    for device in ["disk0", "rng0"] {
        assert!(
            t.lines().any(|l| l.starts_with(&format!("  {device}: "))
                && l.ends_with("messages replayed, all matched")),
            "no line for {device}:\n{t}"
        );
        let out = switchboard(&["replay", log_str, "--device", device, "--no-progress"]);
        let t = text(&out);
        eprintln!("switchboard replay --device {device}:\n{t}");
        assert_eq!(out.status.code(), Some(0), "{device}: {t}");
        assert!(t.contains(" 0 divergences"), "{device}: {t}");
        assert!(
            t.lines().any(|l| l.starts_with(&format!("  {device}: "))
                && l.ends_with("messages replayed, all matched")),
            "no line for {device}:\n{t}"
        );
    }
    eprintln!(
        "guest ready after {:.1} s, whole session {:.1} s",
        booted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
