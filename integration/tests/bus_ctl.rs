// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A way into the buses (issue 11, item 4), through the real binary:
//! `switchboard run examples/topologies/mmio-pio.json --record LOG
//! --control SOCKET`, then `switchboard ctl SOCKET bus-write|bus-read ...`.
//!
//! A string written byte by byte into the UART's THR comes out of its file
//! sink; the test device's registers read back their known values and
//! unassigned space reads all-ones (writes there are dropped); bad requests
//! are refused naming the bus, address and size. Then the test device is
//! removed with slow reads in flight and more racing the removal: every read
//! gets the right value, the typed refusal, or (sent after its region left
//! the bus) all-ones; none hangs; the removal is logged as done only after
//! every read the device answered. After SIGTERM the log replays with no
//! divergence, the UART's and the test device's accesses counted as
//! replayed, and `switchboard log` lists the control client's accesses.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_devices::host::control::Client;
use switchboard_devices::models::slow::{REG_DATA, REG_ID, SLOW_ID};
use switchboard_integration::{output_text, switchboard_bin};

/// The test device's base on `mmio0`, as in the example.
const SLOW_BASE: u64 = 0xd000_0000;
/// How long each test-device read takes: long enough that reads are still
/// in flight when the removal starts.
const READ_DELAY_US: u64 = 1_000_000;
/// Reads in flight when `device-del` is sent.
const IN_FLIGHT: usize = 6;
/// Threads issuing reads while `device-del` runs.
const RACERS: usize = 3;
/// The most reads each of them issues.
const RACER_READS: usize = 20;
/// The longest any one answer may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// A `switchboard run` with its output in files; killed if dropped running.
struct Run {
    child: Child,
    stderr: PathBuf,
}

impl Run {
    fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.stderr) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM");
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "still running 10 s after SIGTERM; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        };
        assert!(status.success(), "{status:?}; stderr:\n{}", self.stderr());
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The example topology in `dir`, com1's output a file and the test
/// device's reads slow.
fn topology(dir: &Path) -> PathBuf {
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/topologies/mmio-pio.json");
    let mut t: Value =
        serde_json::from_str(&std::fs::read_to_string(&example).expect("read the example"))
            .expect("the example is JSON");
    let devices = t["devices"].as_array_mut().expect("devices");
    let ids: Vec<&str> = devices.iter().filter_map(|d| d["id"].as_str()).collect();
    assert_eq!(ids, ["com1", "com2", "slow0"], "the example changed");
    for d in devices.iter_mut() {
        match d["id"].as_str() {
            Some("com1") => d["output"] = json!("file:com1.out"),
            Some("slow0") => d["read_delay_us"] = json!(READ_DELAY_US),
            _ => {}
        }
    }
    let file = dir.join("mmio-pio.json");
    std::fs::write(&file, t.to_string()).expect("write the topology");
    file
}

fn start(dir: &Path, control: &Path, log: &Path) -> Run {
    let file = topology(dir);
    let stderr = dir.join("run.stderr");
    let child = Command::new(switchboard_bin())
        .arg("run")
        .arg(&file)
        .arg("--control")
        .arg(control)
        .arg("--record")
        .arg(log)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("start switchboard run");
    let mut run = Run { child, stderr };
    let start = Instant::now();
    while Client::connect(control).is_err() {
        if let Some(s) = run.child.try_wait().expect("try_wait") {
            panic!("exited at start ({s:?}); stderr:\n{}", run.stderr());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no control socket after 20 s; stderr:\n{}",
            run.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
    run
}

fn ctl(control: &Path, args: &[&str]) -> Output {
    Command::new(switchboard_bin())
        .arg("ctl")
        .arg(control)
        .args(args)
        .output()
        .expect("run switchboard ctl")
}

/// `ctl ARGS`, which must succeed; its stdout, trimmed.
fn ctl_ok(control: &Path, args: &[&str]) -> String {
    let out = ctl(control, args);
    assert!(out.status.success(), "ctl {args:?}: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `ctl ARGS`, which must fail with an error mentioning every one of `parts`.
fn ctl_err(control: &Path, args: &[&str], parts: &[&str]) {
    let out = ctl(control, args);
    let t = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "ctl {args:?}: {t}");
    for p in parts {
        assert!(t.contains(p), "ctl {args:?}: no {p:?} in {t}");
    }
}

/// One 4-byte read of the test device's ID register on a connection of its
/// own; the whole reply.
fn read_id(control: &Path) -> Value {
    let mut c = Client::connect(control).unwrap_or_else(|e| panic!("connect: {e:?}"));
    c.execute(
        "bus-read",
        Some(json!({"bus": "mmio0", "addr": SLOW_BASE + REG_ID, "size": 4})),
    )
    .expect("a reply")
}

/// What a read racing the removal may get: the value (the device answered
/// it), the typed refusal (it reached the device as it drained or
/// stopped), or all-ones (it was sent after the region left the bus).
fn check_racing(reply: &Value) -> &'static str {
    if reply["return"]["value"] == json!(SLOW_ID) {
        return "answered";
    }
    if reply["return"]["value"] == json!(0xffff_ffffu64) {
        return "unassigned";
    }
    let desc = reply["error"]["desc"].as_str().unwrap_or("");
    assert_eq!(reply["error"]["class"], "DeviceNotActive", "{reply}");
    assert!(
        desc.contains("bus-read of 4 bytes at 0xd0000000 on bus 'mmio0'")
            && desc.contains("slow0")
            && (desc.contains("draining") || desc.contains("gone")),
        "{reply}"
    );
    "refused"
}

fn devices(control: &Path) -> Vec<Value> {
    let mut c = Client::connect(control).expect("connect");
    let r = c.execute("query-devices", None).expect("reply");
    r["return"].as_array().expect("a list").clone()
}

/// The log's records, as `switchboard log --json` prints them (the log
/// is in the default form, binary).
fn records(log: &Path) -> Vec<Value> {
    let out = Command::new(switchboard_bin())
        .arg("log")
        .arg(log)
        .arg("--json")
        .output()
        .expect("run switchboard log");
    assert!(out.status.success(), "{}", output_text(&out));
    let text = String::from_utf8(out.stdout).expect("UTF-8 JSON Lines");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

/// `N` from "`device`: N messages replayed, all matched".
fn replayed(text: &str, device: &str) -> u64 {
    let prefix = format!("{device}: ");
    text.lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix(&prefix)?;
            let n = rest.strip_suffix(" messages replayed, all matched")?;
            n.parse().ok()
        })
        .unwrap_or_else(|| panic!("no '{device}: N messages replayed, all matched' in {text}"))
}

#[test]
fn test_ctl_reaches_the_buses_as_a_guest_does_and_the_run_replays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (control, log) = (dir.path().join("ctl.sock"), dir.path().join("run.log"));
    let control = control.as_path();
    let run = start(dir.path(), control, &log);

    // b. A string into com1's THR, byte by byte; out of its sink.
    let text = "hello, bus\n";
    for b in text.bytes() {
        assert_eq!(
            ctl_ok(
                control,
                &["bus-write", "pio0", "0x3f8", "1", &b.to_string()]
            ),
            "{}"
        );
    }
    let out = dir.path().join("com1.out");
    let start = Instant::now();
    while std::fs::read_to_string(&out).unwrap_or_default() != text {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "com1's sink holds {:?}",
            std::fs::read_to_string(&out)
        );
        thread::sleep(Duration::from_millis(10));
    }
    // LSR: transmitter empty (THRE | TEMT).
    assert_eq!(ctl_ok(control, &["bus-read", "pio0", "0x3fd", "1"]), "0x60");

    // c. The test device's registers, and unassigned space.
    let id = format!("{:#x}", SLOW_BASE + REG_ID);
    let data = format!("{:#x}", SLOW_BASE + REG_DATA);
    assert_eq!(
        ctl_ok(control, &["bus-read", "mmio0", &id, "4"]),
        "0x534c4f57"
    );
    ctl_ok(
        control,
        &["bus-write", "mmio0", &data, "8", "0x1122334455667788"],
    );
    assert_eq!(
        ctl_ok(control, &["bus-read", "mmio0", &data, "8"]),
        "0x1122334455667788"
    );
    let reply: Value = serde_json::from_str(&ctl_ok(
        control,
        &[
            "--json",
            "bus-read",
            r#"{"bus": "mmio0", "addr": 4096, "size": "4"}"#,
        ],
    ))
    .expect("a JSON reply");
    assert_eq!(reply, json!({"return": {"value": 0xffff_ffffu64}}));
    assert_eq!(
        ctl_ok(control, &["bus-read", "pio0", "0x100", "2"]),
        "0xffff"
    );
    ctl_ok(control, &["bus-write", "pio0", "0x100", "1", "0x5a"]);
    assert_eq!(ctl_ok(control, &["bus-read", "pio0", "0x100", "1"]), "0xff");
    let stats = ctl_ok(control, &["--json", "query-stats"]);
    let stats: Value = serde_json::from_str(&stats).expect("JSON");
    let bus = |id: &str| {
        stats["return"]["buses"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["id"] == id))
            .cloned()
            .expect("the bus's stats")
    };
    assert_eq!(bus("pio0")["unassigned_reads"], 2, "{stats}");
    assert_eq!(bus("pio0")["unassigned_writes"], 1, "{stats}");
    assert_eq!(bus("mmio0")["unassigned_reads"], 1, "{stats}");

    // Refusals name the bus, the address and the size.
    ctl_err(
        control,
        &["bus-read", "isa0", "0x3f8", "1"],
        &["bus 'isa0'", "0x3f8", "no such bus"],
    );
    ctl_err(
        control,
        &["bus-read", "pio0", "0x3f8", "3"],
        &["bus 'pio0'", "0x3f8", "size 3 is not 1, 2, 4 or 8"],
    );
    ctl_err(
        control,
        &["bus-write", "pio0", "0x3f8", "1", "256"],
        &[
            "1 byte at 0x3f8 on bus 'pio0'",
            "0x100 does not fit in 1 byte",
        ],
    );
    ctl_err(
        control,
        &["bus-read", "pio0", "0xfffe", "4"],
        &[
            "4 bytes at 0xfffe on bus 'pio0'",
            "past the end of the bus (size 0x10000)",
        ],
    );
    ctl_err(
        control,
        &["bus-read", "mmio0", "0xffffffff", "2"],
        &["2 bytes at 0xffffffff on bus 'mmio0'", "past the end"],
    );
    ctl_err(
        control,
        &["bus-write", "pio0", "0x3f8", "1"],
        &["BUS ADDR SIZE VALUE"],
    );

    // d. device-del with reads in flight, and more racing it.
    let (tx, rx) = mpsc::channel::<(&'static str, Value)>();
    let readers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (tx, control) = (tx.clone(), control.to_path_buf());
            thread::spawn(move || {
                let _ = tx.send(("in flight", read_id(&control)));
            })
        })
        .collect();
    let start = Instant::now();
    loop {
        let slow = devices(control)
            .into_iter()
            .find(|d| d["id"] == "slow0")
            .expect("slow0 listed");
        if slow["in_flight"] == json!(IN_FLIGHT) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the reads never were all in flight: {slow}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let removing = Arc::new(AtomicBool::new(true));
    let racers: Vec<_> = (0..RACERS)
        .map(|_| {
            let (tx, control, removing) =
                (tx.clone(), control.to_path_buf(), Arc::clone(&removing));
            thread::spawn(move || {
                for _ in 0..RACER_READS {
                    if !removing.load(Ordering::Acquire) {
                        return;
                    }
                    if tx.send(("racing", read_id(&control))).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let del = {
        let mut c = Client::connect(control).expect("connect");
        c.execute("device-del", Some(json!({"id": "slow0"})))
            .expect("device-del reply")
    };
    removing.store(false, Ordering::Release);
    assert_eq!(del["return"]["id"], "slow0", "{del}");
    // It waited for the reads it found pending.
    assert!(
        del["return"]["drain_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "{del}"
    );
    let (mut answered_in_flight, mut outcomes) = (0, Vec::new());
    loop {
        match rx.recv_timeout(ANSWER_WITHIN) {
            Ok(("in flight", reply)) => {
                assert_eq!(
                    reply,
                    json!({"return": {"value": SLOW_ID}}),
                    "a read the device had accepted"
                );
                answered_in_flight += 1;
            }
            Ok((_, reply)) => outcomes.push(check_racing(&reply)),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("a read got no answer within {ANSWER_WITHIN:?}")
            }
        }
    }
    for t in readers.into_iter().chain(racers) {
        t.join().expect("reader thread");
    }
    assert_eq!(answered_in_flight, IN_FLIGHT);
    assert!(!outcomes.is_empty());
    // After the removal the address is unassigned.
    assert_eq!(
        ctl_ok(control, &["bus-read", "mmio0", &id, "4"]),
        "0xffffffff"
    );
    assert!(devices(control).iter().all(|d| d["id"] != "slow0"));
    eprintln!(
        "racing reads: {} answered, {} refused, {} unassigned",
        outcomes.iter().filter(|o| **o == "answered").count(),
        outcomes.iter().filter(|o| **o == "refused").count(),
        outcomes.iter().filter(|o| **o == "unassigned").count()
    );

    // e. Stop, replay, list.
    run.stop();
    let recs = records(&log);
    let removed = recs
        .iter()
        .find(|r| r["to"] == "slow0" && r["type"] == "removed")
        .expect("slow0's removal is logged");
    let end = |r: &Value| r["time"].as_u64().unwrap_or(0) + r["latency"].as_u64().unwrap_or(0);
    let slow_reads: Vec<&Value> = recs
        .iter()
        .filter(|r| r["to"] == "slow0" && r["type"] == "read")
        .collect();
    assert!(slow_reads.len() > IN_FLIGHT);
    for r in &slow_reads {
        assert!(end(r) <= end(removed), "answered after the drain: {r}");
    }
    let sent: String = recs
        .iter()
        .filter(|r| r["to"] == "com1" && r["type"] == "write" && r["payload"]["offset"] == 0)
        .map(|r| char::from(r["payload"]["value"].as_u64().expect("a byte") as u8))
        .collect();
    assert_eq!(sent, text);
    let from_ctl = |to: &str, kind: &str| {
        recs.iter()
            .filter(|r| r["from"] == "ctl" && r["to"] == to && r["type"] == kind)
            .count()
    };
    assert_eq!(from_ctl("pio0", "bus-write"), text.len() + 1);
    assert!(from_ctl("mmio0", "bus-read") >= IN_FLIGHT + outcomes.len() + 2);

    let out = Command::new(switchboard_bin())
        .arg("replay")
        .arg(&log)
        .arg("--no-progress")
        .output()
        .expect("run switchboard replay");
    let t = output_text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(" 0 divergences"), "{t}");
    // Every write and the LSR read; every read of the test device and its
    // DATA write.
    assert_eq!(replayed(&t, "com1"), text.len() as u64 + 1, "{t}");
    assert!(replayed(&t, "slow0") > slow_reads.len() as u64, "{t}");

    let out = Command::new(switchboard_bin())
        .arg("log")
        .arg(&log)
        .args(["--type", "bus-write"])
        .output()
        .expect("run switchboard log");
    let t = output_text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(
        t.lines()
            .filter(|l| l.contains("ctl") && l.contains("pio0"))
            .count(),
        text.len() + 1,
        "{t}"
    );
}

#[test]
fn test_reads_still_pending_at_the_stop_deadline_are_refused_naming_the_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (control, log) = (dir.path().join("ctl.sock"), dir.path().join("run.log"));
    let control = control.as_path();
    let run = start(dir.path(), control, &log);
    // Reads that take longer than a removal waits (3 s): the device is
    // stopped with them pending.
    let added = ctl_ok(
        control,
        &[
            "device-add",
            r#"{"id": "slow1", "kind": "test-device", "bus": "mmio0", "addr": "0xe0000000",
                "read_delay_us": 60000000}"#,
        ],
    );
    assert!(added.contains("slow1"), "{added}");
    let (tx, rx) = mpsc::channel::<Value>();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (tx, control) = (tx.clone(), control.to_path_buf());
            thread::spawn(move || {
                let mut c = Client::connect(&control).expect("connect");
                let reply = c
                    .execute(
                        "bus-read",
                        Some(json!({"bus": "mmio0", "addr": "0xe0000000", "size": 4})),
                    )
                    .expect("a reply");
                let _ = tx.send(reply);
            })
        })
        .collect();
    drop(tx);
    let start = Instant::now();
    while !devices(control)
        .iter()
        .any(|d| d["id"] == "slow1" && d["in_flight"] == 2)
    {
        assert!(start.elapsed() < Duration::from_secs(10), "never in flight");
        thread::sleep(Duration::from_millis(5));
    }
    ctl_err(
        control,
        &["device-del", r#"{"id": "slow1"}"#],
        &["slow1", "drain deadline passed", "2 accesses pending"],
    );
    for _ in 0..2 {
        let reply = rx.recv_timeout(ANSWER_WITHIN).expect("an answer");
        assert_eq!(
            reply["error"],
            json!({
                "class": "DeviceNotActive",
                "desc": "bus-read of 4 bytes at 0xe0000000 on bus 'mmio0': refused by device \
                         'slow1': Receiver is gone"
            }),
            "{reply}"
        );
    }
    for t in readers {
        t.join().expect("reader thread");
    }
    assert_eq!(
        ctl_ok(control, &["bus-read", "mmio0", "0xe0000000", "4"]),
        "0xffffffff"
    );
    run.stop();
}
