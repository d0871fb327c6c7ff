// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Supervised restart (issue 12) through the real binary: a vhost-user
//! device that fails (a contained panic of a virtio-fault device, or a
//! memfd its frontend shrank) is served again, as a fresh instance, on the
//! same socket, at most `restart.limit` times; then it stays stopped with
//! the reason. Asserted under `run`: the frontend is disconnected,
//! reconnects to the same socket and is served again (the fresh instance
//! counts its requests from 0); `query-devices` shows `restarting`, the
//! `restarts` count and, at the limit, `stopped` with `restart limit N
//! reached`; `query-failures` lists every failure; another device answers
//! throughout; `device-del` during a backoff cancels the restart and
//! returns at once; SIGTERM during a backoff exits 0 at once. Under
//! `serve rng --restart-limit 1`: the process outlives the first failure,
//! serves a fresh frontend, exits 0 by itself at the limit, and its log
//! replays with no divergence across the restart.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_devices::host::control::Client;
use switchboard_integration::frontend::{self, TestFrontend, VIRTQ_DESC_F_WRITE};
use switchboard_integration::process::{device, execute, until, Proc, WAIT};
use switchboard_integration::{output_text, switchboard_bin};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

/// Bytes of each request's one writable buffer.
const LEN: u32 = 16;

fn failures(ctl: &mut Client, id: &str) -> Vec<String> {
    let reply = execute(ctl, "query-failures", None);
    reply["return"]
        .as_array()
        .unwrap_or_else(|| panic!("query-failures: {reply}"))
        .iter()
        .filter(|f| f["id"] == id)
        .map(|f| f["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits for `id` to be in `state` with `restarts` restarts; returns its
/// entry.
fn wait_state(ctl: &mut Client, id: &str, state: &str, restarts: u64) -> Value {
    let mut last = Value::Null;
    let start = Instant::now();
    loop {
        if let Some(d) = device(ctl, id) {
            if d["state"] == state && d["restarts"] == restarts {
                return d;
            }
            last = d;
        }
        assert!(
            start.elapsed() < WAIT,
            "{id}: not {state} after {restarts} restarts: {last}"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// The guest address of request `n`'s buffer.
fn buf(n: u64) -> u64 {
    0x10_0000 + n * 0x1000
}

/// Sends request `n` (one writable buffer) and waits for its used entry;
/// returns its length and the buffer's bytes.
fn request(fe: &mut TestFrontend, n: u64) -> (u32, Vec<u8>) {
    let head = fe
        .add_chain(0, &[(buf(n), LEN, VIRTQ_DESC_F_WRITE)])
        .expect("chain");
    fe.kick(0).expect("kick");
    let used = fe.wait_used(0, 1, WAIT).expect("answered");
    assert_eq!(used[0].0, head, "request {n}");
    let mut bytes = vec![0u8; LEN as usize];
    fe.mem
        .read_slice(&mut bytes, GuestAddress(buf(n)))
        .expect("read guest memory");
    (used[0].1, bytes)
}

/// An entropy device answers one request with entropy.
fn entropy(fe: &mut TestFrontend, n: u64) {
    let (len, bytes) = request(fe, n);
    assert_eq!(len, LEN, "request {n}");
    assert!(bytes.iter().any(|&b| b != 0), "request {n}: no entropy");
}

/// The fault device's answer to request number `n` of its instance: `n`
/// in every byte.
fn fault_answers(fe: &mut TestFrontend, n: u64) {
    assert_eq!(request(fe, n), (LEN, vec![n as u8; LEN as usize]));
}

fn disconnected(fe: &TestFrontend) {
    until("the frontend disconnected", || {
        fe.frontend.get_features().is_err()
    });
}

/// Requests before the fault device's panic, per instance.
const PANIC_AFTER: u64 = 2;

#[test]
fn test_a_failed_device_is_restarted_on_its_socket_until_its_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topology = json!({ "devices": [
        { "id": "fault0", "kind": "virtio-fault", "panic_after": PANIC_AFTER,
          "vhost_user": { "socket": "fault0.sock",
                          "restart": { "limit": 2, "backoff_ms": 50, "max_backoff_ms": "0x64" } } },
        { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock" } },
    ] });
    let (proc, mut ctl) = Proc::run(dir.path(), &topology, &["fault0.sock", "rng0.sock"]);
    let (fault_sock, rng_sock) = (dir.path().join("fault0.sock"), dir.path().join("rng0.sock"));
    let mut rng = frontend::connect(&rng_sock, 1, 64).expect("rng0");
    let mut n_rng = 0;
    let mut rng_answers = |rng: &mut TestFrontend| {
        n_rng += 1;
        entropy(rng, n_rng);
    };
    rng_answers(&mut rng);
    let info = device(&mut ctl, "fault0").expect("listed");
    assert_eq!(
        (&info["state"], &info["restarts"]),
        (&json!("running"), &json!(0))
    );

    // Three instances: the first and two restarts. Each answers
    // PANIC_AFTER requests, counted from 1 (a fresh device), and panics on
    // the next; the frontend is disconnected and reconnects to the same
    // socket.
    for instance in 0..3u64 {
        let mut fe = frontend::connect(&fault_sock, 1, 64).expect("connect to fault0");
        for n in 1..=PANIC_AFTER {
            fault_answers(&mut fe, n);
        }
        rng_answers(&mut rng);
        // Answered with nothing written (no fail_status): a drop guard.
        assert_eq!(request(&mut fe, PANIC_AFTER + 1).0, 0);
        disconnected(&fe);
        rng_answers(&mut rng);
        if instance < 2 {
            // Restarted on the same socket file, which was never removed.
            assert!(fault_sock.exists());
            let info = wait_state(&mut ctl, "fault0", "running", instance + 1);
            assert!(info.get("failure").is_none(), "{info}");
            assert_eq!(failures(&mut ctl, "fault0").len() as u64, instance + 1);
        }
    }

    // The limit is reached: stopped with the last failure and why.
    let info = wait_state(&mut ctl, "fault0", "stopped", 2);
    let failure = info["failure"].as_str().unwrap_or_default();
    assert!(
        failure.contains("injected panic") && failure.ends_with("; restart limit 2 reached"),
        "{info}"
    );
    let all = failures(&mut ctl, "fault0");
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().all(|r| r.contains("injected panic")), "{all:?}");
    until("the socket removed", || !fault_sock.exists());
    let info = device(&mut ctl, "rng0").expect("listed");
    assert_eq!(
        (&info["state"], &info["restarts"]),
        (&json!("running"), &json!(0))
    );
    rng_answers(&mut rng);

    // Removing it succeeds, as for any failed device.
    let reply = execute(&mut ctl, "device-del", Some(json!({ "id": "fault0" })));
    assert_eq!(reply["return"]["id"], "fault0", "{reply}");
    drop(rng);
    assert!(proc.terminate().success());
}

#[test]
fn test_a_device_failing_every_time_stops_at_its_limit_and_a_backoff_ends_on_del_or_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let restart = |limit: u64, backoff_ms: u64| json!({ "limit": limit, "backoff_ms": backoff_ms, "max_backoff_ms": backoff_ms.max(5000) });
    let topology = json!({ "devices": [
        // Panics on every first request.
        { "id": "f0", "kind": "virtio-fault",
          "vhost_user": { "socket": "f0.sock", "restart": restart(2, 10) } },
        // A backoff far longer than the test waits.
        { "id": "f1", "kind": "virtio-fault",
          "vhost_user": { "socket": "f1.sock", "restart": restart(1, 600_000) } },
        { "id": "f2", "kind": "virtio-fault",
          "vhost_user": { "socket": "f2.sock", "restart": restart(1, 600_000) } },
    ] });
    let (proc, mut ctl) = Proc::run(dir.path(), &topology, &["f0.sock", "f1.sock", "f2.sock"]);

    let f0 = dir.path().join("f0.sock");
    for restarts in 0..=2 {
        wait_state(&mut ctl, "f0", "running", restarts);
        let mut fe = frontend::connect(&f0, 1, 64).expect("connect to f0");
        assert_eq!(request(&mut fe, 1).0, 0, "instance {restarts}");
        disconnected(&fe);
    }
    let info = wait_state(&mut ctl, "f0", "stopped", 2);
    assert!(
        info["failure"]
            .as_str()
            .is_some_and(|f| f.ends_with("; restart limit 2 reached")),
        "{info}"
    );
    assert_eq!(failures(&mut ctl, "f0").len(), 3);

    // f1 fails and waits for its restart; device-del cancels it at once.
    let f1 = dir.path().join("f1.sock");
    let mut fe = frontend::connect(&f1, 1, 64).expect("connect to f1");
    assert_eq!(request(&mut fe, 1).0, 0);
    disconnected(&fe);
    let info = wait_state(&mut ctl, "f1", "restarting", 0);
    assert!(
        info["failure"]
            .as_str()
            .is_some_and(|f| f.contains("injected panic")),
        "{info}"
    );
    let start = Instant::now();
    let reply = execute(&mut ctl, "device-del", Some(json!({ "id": "f1" })));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "device-del waited for the backoff"
    );
    assert_eq!(reply["return"]["id"], "f1", "{reply}");
    assert!(device(&mut ctl, "f1").is_none());
    until("f1's socket removed", || !f1.exists());

    // f2 fails and waits; SIGTERM ends the wait and the process, exit 0.
    let mut fe = frontend::connect(&dir.path().join("f2.sock"), 1, 64).expect("connect to f2");
    assert_eq!(request(&mut fe, 1).0, 0);
    disconnected(&fe);
    wait_state(&mut ctl, "f2", "restarting", 0);
    let start = Instant::now();
    assert!(proc.terminate().success());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "SIGTERM waited for the backoff"
    );
}

#[test]
fn test_serve_restarts_a_device_whose_memfd_shrank_and_its_log_replays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("rng.sock");
    let log = dir.path().join("rng.log");
    let args = [
        "serve",
        "rng",
        "--socket-path",
        socket.to_str().expect("utf-8 path"),
        "--restart-limit",
        "1",
        "--restart-backoff-ms",
        "20",
        "--record",
        log.to_str().expect("utf-8 path"),
        "--record-data",
        "value",
    ];
    let mut proc = Proc::start(dir.path(), &args, &[&socket]);
    // Twice: a frontend is served, then shrinks its memfd under a buffer,
    // which fails the device (SIGBUS contained).
    for round in 0..2 {
        let memfd = frontend::memfd(frontend::MEM_SIZE).expect("memfd");
        let mut fe = frontend::connect_with(&socket, 1, 64, memfd).expect("connect");
        entropy(&mut fe, 1);
        entropy(&mut fe, 2);
        fe.file.set_len(0x8_0000).expect("shrink the memfd");
        fe.add_chain(0, &[(0x20_0000, LEN, VIRTQ_DESC_F_WRITE)])
            .expect("chain");
        fe.kick(0).expect("kick");
        disconnected(&fe);
        if round == 0 {
            // Not the end of serve: the device is restarted.
            thread::sleep(Duration::from_millis(100));
            proc.assert_alive("after the first failure");
            assert!(socket.exists());
        }
    }
    // The limit is reached: every device stopped by itself, and serve ends.
    assert!(proc.exit().success(), "{}", proc.stderr());
    let stderr = proc.stderr();
    assert!(stderr.contains("restart limit 1 reached"), "{stderr}");
    assert!(!socket.exists());

    let out = Command::new(switchboard_bin())
        .arg("replay")
        .arg(&log)
        .output()
        .expect("run replay");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("0 divergences"), "{text}");
    // Both failures are in the log, with their reasons, and replay names
    // them.
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" failed at seq "))
        .collect();
    assert_eq!(failed.len(), 2, "{text}");
    assert!(failed.iter().all(|l| l.contains("memory")), "{text}");
}
