// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Panic containment (issue 10, item 4) through the real `switchboard run`:
//! a virtio-fault device panics on request, in its request handler on the
//! queue worker or on its own I/O thread, while it holds requests in
//! flight. Asserted: its in-flight requests are answered with the failure
//! status (used entries written), its frontend is disconnected, it shows as
//! `stopped` with the reason in `query-devices` and in `query-failures`,
//! GET_VRING_BASE and `device-del` return, and a virtio-blk disk in the
//! same process keeps answering reads and writes, checked against the image
//! file, before, during and after; SIGTERM then exits 0. An in-process test
//! covers the failure with no status byte (empty answers) next to a
//! virtio-rng.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_devices::host::control::Client;
use switchboard_devices::models::fault::{FaultConfig, FaultDevice, PanicIn};
use switchboard_devices::models::rng::Rng;
use switchboard_integration::frontend::{
    self, TestFrontend, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTQ_DESC_F_WRITE,
};
use switchboard_integration::process::{device, execute, until, WAIT};
use switchboard_integration::{serve_in_process, switchboard_bin};
use switchboard_runtime::State;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

/// Requests the fault device gets before the one that panics.
const PANIC_AFTER: u64 = 4;
/// How many of those it keeps in flight until the panic.
const HOLD: u64 = 2;
/// The status the fault device's failed requests get.
const FAIL_STATUS: u8 = 0xee;
/// Bytes of each fault-device request's one writable buffer.
const FAULT_LEN: u32 = 16;
/// Bytes of the image with known contents (the rest reads as zeroes).
const KNOWN: usize = 1 << 20;

/// A running `switchboard run`; killed if the test fails before SIGTERM.
struct Run {
    child: Child,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Run {
    /// Starts `switchboard run FILE --control CTL` and waits for its
    /// "devices running" line.
    fn start(file: &Path, ctl: &Path) -> Run {
        let mut child = Command::new(switchboard_bin())
            .arg("run")
            .arg(file)
            .arg("--control")
            .arg(ctl)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start switchboard run");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            // Keeps reading after the test stops listening, so the process
            // never writes to a closed pipe.
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let run = Run { child };
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("devices running") => {
                    assert!(line.contains("2 of 2 devices running"), "{line}");
                    return run;
                }
                Ok(line) => seen.push(line),
                Err(_) => panic!("no 'devices running' line; stdout:\n{}", seen.join("\n")),
            }
        }
    }

    /// Sends SIGTERM and waits (at most `WAIT`) for the exit.
    fn terminate(mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(start.elapsed() < WAIT, "no exit within {WAIT:?} of SIGTERM");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs `f` on a thread of its own and returns its result, failing the
/// test if it does not return within `WAIT` (a hang is the bug looked for).
fn returns<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("{what} did not return within {WAIT:?}"))
}

/// An 8 MiB image whose first MiB holds known bytes.
fn image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    let known: Vec<u8> = (0..KNOWN).map(|i| (i * 7 + i / 512) as u8).collect();
    std::fs::write(&path, &known).expect("write the image");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(8 << 20))
        .expect("size the image");
    path
}

fn topology(dir: &Path, image: &Path, panic_in: PanicIn) -> PathBuf {
    let file = dir.join("topology.json");
    let text = json!({ "devices": [
        { "id": "disk0", "kind": "virtio-blk", "path": image,
          "vhost_user": { "socket": "disk0.sock" } },
        { "id": "fault0", "kind": "virtio-fault", "panic_after": PANIC_AFTER, "hold": HOLD,
          "panic_in": panic_in.name(), "fail_status": FAIL_STATUS,
          "vhost_user": { "socket": "fault0.sock" } },
    ] });
    std::fs::write(&file, text.to_string()).expect("write the topology");
    file
}

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, offset))
        .expect("read the image");
    buf
}

/// The disk answers: a read of known bytes matches the image file, and a
/// write reaches the file and reads back. `round` picks the sectors.
fn disk_answers(fe: &mut TestFrontend, image: &Path, round: u64) {
    let sector = round * 8 + 3;
    fe.push_blk(0, 0, VIRTIO_BLK_T_IN, sector, &[0u8; 4096], true)
        .expect("read");
    fe.kick(0).expect("kick");
    fe.wait_used(0, 1, WAIT).expect("read answered");
    assert_eq!(fe.blk_status(0).expect("status"), 0, "round {round}: read");
    assert_eq!(
        fe.blk_data(0, 4096).expect("data"),
        file_bytes(image, sector * 512, 4096),
        "round {round}: the read does not match the image"
    );
    let sector = 4096 + round;
    let data: Vec<u8> = (0..512u32).map(|i| (i as u8) ^ (round as u8 + 1)).collect();
    fe.push_blk(0, 1, VIRTIO_BLK_T_OUT, sector, &data, false)
        .expect("write");
    fe.kick(0).expect("kick");
    fe.wait_used(0, 1, WAIT).expect("write answered");
    assert_eq!(fe.blk_status(1).expect("status"), 0, "round {round}: write");
    assert_eq!(
        file_bytes(image, sector * 512, 512),
        data,
        "round {round}: the write did not reach the image"
    );
    fe.push_blk(0, 2, VIRTIO_BLK_T_IN, sector, &[0u8; 512], true)
        .expect("read back");
    fe.kick(0).expect("kick");
    fe.wait_used(0, 1, WAIT).expect("read-back answered");
    assert_eq!(fe.blk_status(2).expect("status"), 0);
    assert_eq!(fe.blk_data(2, 512).expect("data"), data, "round {round}");
}

/// The guest address of fault-device request `n`'s buffer (from 1).
fn fault_buf(n: u64) -> u64 {
    0x10_0000 + n * 0x1000
}

/// Makes fault-device request `n` available (not kicked); returns its head.
fn push_fault(fe: &mut TestFrontend, n: u64) -> u16 {
    fe.add_chain(0, &[(fault_buf(n), FAULT_LEN, VIRTQ_DESC_F_WRITE)])
        .expect("chain")
}

fn fault_bytes(fe: &TestFrontend, n: u64) -> Vec<u8> {
    let mut buf = vec![0u8; FAULT_LEN as usize];
    fe.mem
        .read_slice(&mut buf, GuestAddress(fault_buf(n)))
        .expect("read guest memory");
    buf
}

/// The whole story for one place of the panic.
fn panic_is_contained_while_the_disk_serves(panic_in: PanicIn, reason: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image(dir.path());
    let file = topology(dir.path(), &image, panic_in);
    let ctl_path = dir.path().join("ctl.sock");
    let run = Run::start(&file, &ctl_path);
    let mut ctl = Client::connect(&ctl_path).expect("control socket");
    let mut disk = frontend::connect(&dir.path().join("disk0.sock"), 1, 64).expect("disk");
    let fault_sock = dir.path().join("fault0.sock");
    let mut fault = frontend::connect(&fault_sock, 1, 64).expect("fault device");
    disk_answers(&mut disk, &image, 0);

    // Requests 1 and 2 are answered.
    let answered: Vec<u16> = (1..=PANIC_AFTER - HOLD)
        .map(|n| push_fault(&mut fault, n))
        .collect();
    fault.kick(0).expect("kick");
    let used = fault
        .wait_used(0, answered.len() as u16, WAIT)
        .expect("answers");
    assert_eq!(
        used,
        answered.iter().map(|h| (*h, FAULT_LEN)).collect::<Vec<_>>()
    );
    for n in 1..=PANIC_AFTER - HOLD {
        assert_eq!(fault_bytes(&fault, n), vec![n as u8; FAULT_LEN as usize]);
    }

    // Requests 3 and 4 are held: in flight, unanswered.
    let mut failed: Vec<u16> = (PANIC_AFTER - HOLD + 1..=PANIC_AFTER)
        .map(|n| push_fault(&mut fault, n))
        .collect();
    fault.kick(0).expect("kick");
    until("the fault device holds its requests", || {
        device(&mut ctl, "fault0").is_some_and(|d| d["in_flight"] == HOLD)
    });
    disk_answers(&mut disk, &image, 1);
    assert_eq!(
        fault.used_idx(0).expect("used"),
        answered.len() as u16,
        "a held request was answered before the panic"
    );

    // Request 5 panics; request 6 comes in the same kick, after it.
    failed.push(push_fault(&mut fault, PANIC_AFTER + 1));
    failed.push(push_fault(&mut fault, PANIC_AFTER + 2));
    fault.kick(0).expect("kick");

    // Every request in flight, and the one after, is answered with the
    // failure status: one byte written, the last.
    let mut used = fault
        .wait_used(0, failed.len() as u16, WAIT)
        .expect("the failed requests are answered");
    used.sort_unstable();
    failed.sort_unstable();
    assert_eq!(
        used,
        failed.iter().map(|h| (*h, 1)).collect::<Vec<_>>(),
        "{}",
        panic_in.name()
    );
    for n in PANIC_AFTER - HOLD + 1..=PANIC_AFTER + 2 {
        let mut want = vec![0u8; FAULT_LEN as usize];
        want[FAULT_LEN as usize - 1] = FAIL_STATUS;
        assert_eq!(fault_bytes(&fault, n), want, "request {n}");
    }

    // The device is stopped with the reason, and the supervisor knows.
    until("fault0 stopped", || {
        device(&mut ctl, "fault0").is_some_and(|d| d["state"] == "stopped")
    });
    let info = device(&mut ctl, "fault0").expect("fault0 listed");
    let failure = info["failure"].as_str().unwrap_or_default();
    assert!(failure.contains(reason), "{info}");
    assert_eq!(info["in_flight"], 0, "{info}");
    let info = device(&mut ctl, "disk0").expect("disk0 listed");
    assert_eq!(info["state"], "running", "{info}");
    assert!(info.get("failure").is_none(), "{info}");
    let failures = execute(&mut ctl, "query-failures", None);
    let failures = failures["return"].as_array().expect("a list").clone();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["id"], "fault0");
    assert!(
        failures[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(reason)),
        "{failures:?}"
    );

    // Its frontend is disconnected: the connection fails, and the socket
    // (whose serve loop has ended) is gone, so nobody can connect again.
    until("the fault device's frontend disconnected", || {
        fault.frontend.get_features().is_err()
    });
    until("the fault device's socket removed", || !fault_sock.exists());
    // GET_VRING_BASE returns (with an error: there is no connection left).
    let (fault, base) = returns("GET_VRING_BASE", move || {
        let base = fault.frontend.get_vring_base(0);
        (fault, base)
    });
    assert!(
        base.is_err(),
        "GET_VRING_BASE on a closed connection: {base:?}"
    );
    drop(fault);

    disk_answers(&mut disk, &image, 2);

    // device-del returns, and the device is gone. (Removing a device that
    // already failed succeeds: the failure was reported when it happened,
    // and query-failures still lists it.)
    let (mut ctl, reply) = returns("device-del", move || {
        let reply = execute(&mut ctl, "device-del", Some(json!({ "id": "fault0" })));
        (ctl, reply)
    });
    assert_eq!(reply["return"]["id"], "fault0", "{reply}");
    assert!(device(&mut ctl, "fault0").is_none());
    let failures = execute(&mut ctl, "query-failures", None);
    assert!(
        failures["return"].as_array().is_some_and(|f| f
            .iter()
            .any(|f| f["id"] == "fault0" && f["reason"] == reason)),
        "{failures}"
    );
    // Its id and socket are free: a new device takes them, and goes.
    let reply = execute(
        &mut ctl,
        "device-add",
        Some(
            json!({ "id": "fault0", "kind": "virtio-fault", "panic_after": 100,
                     "vhost_user": { "socket": "fault0.sock" } }),
        ),
    );
    assert_eq!(reply["return"]["id"], "fault0", "{reply}");
    let info = device(&mut ctl, "fault0").expect("the new fault0 listed");
    assert_eq!(info["state"], "running", "{info}");
    let reply = execute(&mut ctl, "device-del", Some(json!({ "id": "fault0" })));
    assert_eq!(reply["return"]["id"], "fault0", "{reply}");
    let info = device(&mut ctl, "disk0").expect("disk0 listed");
    assert_eq!(info["state"], "running", "{info}");
    disk_answers(&mut disk, &image, 3);

    // The known bytes were never written; every write landed where sent.
    let known: Vec<u8> = (0..KNOWN).map(|i| (i * 7 + i / 512) as u8).collect();
    assert_eq!(file_bytes(&image, 0, KNOWN), known, "the known MiB changed");
    drop(disk);
    drop(ctl);
    let status = run.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[test]
fn test_panic_in_handle_fails_the_fault_device_alone() {
    panic_is_contained_while_the_disk_serves(
        PanicIn::Handle,
        "queue 0: handle request 4: virtio-fault: injected panic on request 5 (queue worker), \
         with 2 more requests held",
    );
}

#[test]
fn test_panic_on_its_io_thread_fails_the_fault_device_alone() {
    panic_is_contained_while_the_disk_serves(
        PanicIn::IoThread,
        "I/O thread: virtio-fault: injected panic on request 5 (I/O thread), with 2 more \
         requests held",
    );
}

#[test]
fn test_io_thread_panic_without_a_status_answers_empty_while_rng_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faulty = serve_in_process(
        FaultDevice::new(FaultConfig {
            panic_after: 3,
            hold: 3,
            panic_in: PanicIn::IoThread,
            fail_status: None,
        })
        .expect("fault device"),
        1,
        dir.path().join("fault.sock"),
    );
    let rng = serve_in_process(Rng::new(None).expect("rng"), 1, dir.path().join("rng.sock"));
    let mut rng_fe = frontend::connect(&rng.socket, 1, 64).expect("rng");
    let entropy = |fe: &mut TestFrontend| {
        let head = fe
            .add_chain(0, &[(0x10_0000, 64, VIRTQ_DESC_F_WRITE)])
            .expect("chain");
        fe.kick(0).expect("kick");
        assert_eq!(fe.wait_used(0, 1, WAIT).expect("entropy"), vec![(head, 64)]);
    };
    entropy(&mut rng_fe);

    let mut fe = frontend::connect(&faulty.socket, 1, 64).expect("fault device");
    let mut heads: Vec<u16> = (1..=3).map(|n| push_fault(&mut fe, n)).collect();
    fe.kick(0).expect("kick");
    until("three requests held", || {
        faulty.server.device().held() == 3 && faulty.server.in_flight() == 3
    });
    entropy(&mut rng_fe);
    heads.push(push_fault(&mut fe, 4));
    fe.kick(0).expect("kick");

    let mut used = fe.wait_used(0, 4, WAIT).expect("every request answered");
    used.sort_unstable();
    heads.sort_unstable();
    assert_eq!(
        used,
        heads.iter().map(|h| (*h, 0)).collect::<Vec<_>>(),
        "answered with nothing written"
    );
    for n in 1..=4 {
        assert_eq!(fault_bytes(&fe, n), vec![0u8; FAULT_LEN as usize]);
    }
    let gate = faulty.server.gate();
    until("the fault device stopped", || {
        gate.state() == State::Stopped
    });
    let failure = gate.failure().expect("a failure reason");
    assert!(
        failure.starts_with("I/O thread: virtio-fault: injected panic on request 4"),
        "{failure}"
    );
    assert_eq!(gate.in_flight(), 0);
    until("the frontend disconnected", || {
        fe.frontend.get_features().is_err()
    });
    until("the socket removed", || !faulty.socket.exists());
    let (_fe, base) = returns("GET_VRING_BASE", move || {
        let base = fe.frontend.get_vring_base(0);
        (fe, base)
    });
    assert!(base.is_err(), "{base:?}");

    entropy(&mut rng_fe);
    assert_eq!(rng.server.gate().state(), State::Running);
    drop(rng_fe);
    rng.finish();
}

/// A device that never answers the requests it holds (it would panic only
/// on the next one) cannot hold up `device-del` or SIGTERM: the removal
/// returns within the drain deadline with the report of what was still in
/// flight, the device is stopped anyway, and the disk keeps serving.
#[test]
fn test_device_del_of_a_device_that_never_answers_returns_with_the_drain_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image(dir.path());
    let file = dir.path().join("topology.json");
    let text = json!({ "devices": [
        { "id": "disk0", "kind": "virtio-blk", "path": image,
          "vhost_user": { "socket": "disk0.sock" } },
        { "id": "fault0", "kind": "virtio-fault", "panic_after": 2, "hold": 2,
          "vhost_user": { "socket": "fault0.sock" } },
    ] });
    std::fs::write(&file, text.to_string()).expect("write the topology");
    let ctl_path = dir.path().join("ctl.sock");
    let run = Run::start(&file, &ctl_path);
    let mut ctl = Client::connect(&ctl_path).expect("control socket");
    let mut disk = frontend::connect(&dir.path().join("disk0.sock"), 1, 64).expect("disk");
    let mut fault =
        frontend::connect(&dir.path().join("fault0.sock"), 1, 64).expect("fault device");
    push_fault(&mut fault, 1);
    push_fault(&mut fault, 2);
    fault.kick(0).expect("kick");
    until("the fault device holds both requests", || {
        device(&mut ctl, "fault0").is_some_and(|d| d["in_flight"] == 2)
    });

    let start = Instant::now();
    let (mut ctl, reply) = returns("device-del", move || {
        let reply = execute(&mut ctl, "device-del", Some(json!({ "id": "fault0" })));
        (ctl, reply)
    });
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "device-del took {took:?}");
    let desc = reply["error"]["desc"].as_str().unwrap_or_default();
    assert!(
        desc.contains("drain deadline passed") && desc.contains("2 in flight"),
        "{reply}"
    );
    assert!(device(&mut ctl, "fault0").is_none(), "fault0 still listed");
    disk_answers(&mut disk, &image, 0);
    drop(fault);
    drop(disk);
    drop(ctl);
    let status = run.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}");
}
