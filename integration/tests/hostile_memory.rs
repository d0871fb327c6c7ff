// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! No frontend's memory table kills the process (issue 12), through the
//! real binary. A frontend that gives a region larger than its memfd, an
//! `mmap_offset` past the end of the file, more regions than the slots
//! advertised (ADD_MEM_REG) or than one SET_MEM_TABLE may carry is sent an
//! error and disconnected; the process stays up, logs the region, and
//! serves a fresh frontend; so does one whose ADD_MEM_REG user address
//! overflows. Under `switchboard run` with two virtio-rng
//! devices, a frontend that shrinks its memfd under a buffer, or under the
//! rings, then kicks, fails its device alone (`query-devices` shows it
//! stopped with the reason) while the other device answers requests
//! throughout; SIGTERM then exits 0.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_devices::host::control::Client;
use switchboard_devices::vhost_user::{MAX_MEM_SLOTS, MAX_TABLE_REGIONS};
use switchboard_integration::frontend::{self, raw_region, VIRTQ_DESC_F_WRITE};
use switchboard_integration::process::{device, Proc, WAIT};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

/// A user address for crafted regions (the backend only translates ring
/// addresses with it).
const USER: u64 = 0x6000_0000_0000;

/// `switchboard serve rng` on `DIR/rng.sock`.
fn serve_rng(dir: &Path) -> (Proc, PathBuf) {
    let socket = dir.join("rng.sock");
    let proc = Proc::start(
        dir,
        &[
            "serve",
            "rng",
            "--socket-path",
            socket.to_str().expect("utf-8 path"),
        ],
        &[&socket],
    );
    (proc, socket)
}

/// A fresh, correct frontend gets one entropy request answered on `socket`.
fn one_request(socket: &Path) {
    let mut fe = frontend::connect(socket, 1, 64).expect("a fresh frontend connects");
    let head = fe
        .add_chain(0, &[(0x10_0000, 32, VIRTQ_DESC_F_WRITE)])
        .expect("chain");
    fe.kick(0).expect("kick");
    let used = fe.wait_used(0, 1, WAIT).expect("answered");
    assert_eq!(used, vec![(head, 32)]);
    let mut buf = [0u8; 32];
    fe.mem
        .read_slice(&mut buf, GuestAddress(0x10_0000))
        .expect("read");
    assert!(buf.iter().any(|&b| b != 0), "no entropy");
}

/// Sends a one-region table the backend must refuse, then tries to use the
/// part past the file's end anyway (a ring there, a kick); asserts the
/// table was refused, the process is up, its log names the region, and a
/// fresh frontend is served.
fn refused_table(size: u64, offset: u64, file_len: u64, logged: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, socket) = serve_rng(dir.path());
    let mut fe = frontend::handshake(&socket, 1).expect("handshake");
    let file = frontend::memfd(file_len).expect("memfd");
    let refused = fe.set_mem_table(&[raw_region(0, size, USER, offset, &file)]);
    assert!(refused.is_err(), "the table was accepted");
    // The ring in the part past the end of the file, then a kick: the
    // connection is closed by now, so these fail; nothing may crash.
    let ring = USER + size - 0x1_0000;
    let config = vhost::VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: ring,
        used_ring_addr: ring + 0x2000,
        avail_ring_addr: ring + 0x1000,
        log_addr: None,
    };
    let kick = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
    let _ = fe.set_vring_num(0, 64);
    let _ = fe.set_vring_addr(0, &config);
    let _ = fe.set_vring_kick(0, &kick);
    let _ = fe.set_vring_enable(0, true);
    let _ = kick.write(1);
    drop(fe);
    proc.assert_alive("after the refused table");
    one_request(&socket);
    proc.assert_alive("after the fresh frontend");
    let log = proc.stderr();
    assert!(
        log.contains("memory table refused") && log.contains(logged),
        "the log does not name the region ({logged}):\n{log}"
    );
    assert!(proc.terminate().success());
}

#[test]
fn test_a_region_larger_than_its_file_is_refused_and_a_fresh_frontend_is_served() {
    refused_table(
        16 << 20,
        0,
        1 << 20,
        "Memory region 0 (guest 0x0, 0x1000000 bytes, file offset 0x0) ends past the end of \
         its file (0x100000 bytes)",
    );
}

#[test]
fn test_an_offset_past_the_end_of_the_file_is_refused_and_a_fresh_frontend_is_served() {
    refused_table(
        1 << 20,
        2 << 20,
        1 << 20,
        "Memory region 0 (guest 0x0, 0x100000 bytes, file offset 0x200000) ends past the end \
         of its file (0x100000 bytes)",
    );
}

#[test]
fn test_add_mem_reg_past_the_advertised_slots_is_refused_and_a_fresh_frontend_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, socket) = serve_rng(dir.path());
    let mut fe = frontend::connect(&socket, 1, 64).expect("connect");
    let slots = fe.frontend.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS");
    assert_eq!(slots, MAX_MEM_SLOTS as u64, "advertised slots");
    let page = frontend::memfd(0x1000).expect("memfd");
    // The table holds one region already: 600 more, one page each.
    let mut accepted = 0;
    let mut first_refused = None;
    for i in 0..600u64 {
        let region = raw_region(
            0x1_0000_0000 + i * 0x1000,
            0x1000,
            USER + i * 0x1000,
            0,
            &page,
        );
        match fe.frontend.add_mem_region(&region) {
            Ok(_) => accepted += 1,
            Err(_) => {
                first_refused.get_or_insert(i);
            }
        }
    }
    assert_eq!(accepted, MAX_MEM_SLOTS as u64 - 1, "ADD_MEM_REG accepted");
    assert_eq!(first_refused, Some(MAX_MEM_SLOTS as u64 - 1));
    drop(fe);
    proc.assert_alive("after 600 ADD_MEM_REG");
    one_request(&socket);
    let log = proc.stderr();
    assert!(
        log.contains("The memory table would hold 510 regions, more than the 509 slots advertised"),
        "{log}"
    );
    assert!(proc.terminate().success());
}

#[test]
fn test_a_set_mem_table_with_more_regions_than_allowed_is_refused_and_the_limit_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, socket) = serve_rng(dir.path());
    let n = MAX_TABLE_REGIONS as u64 + 1;
    let file = frontend::memfd(n * 0x1000).expect("memfd");
    let table = |count: u64| -> Vec<_> {
        (0..count)
            .map(|i| raw_region(i << 20, 0x1000, USER + (i << 20), i * 0x1000, &file))
            .collect()
    };
    let fe = frontend::handshake(&socket, 1).expect("handshake");
    fe.set_mem_table(&table(n - 1))
        .expect("a table at the limit is accepted");
    drop(fe);
    let fe = frontend::handshake(&socket, 1).expect("handshake");
    assert!(
        fe.set_mem_table(&table(n)).is_err(),
        "a table over the limit was accepted"
    );
    drop(fe);
    proc.assert_alive("after the refused table");
    one_request(&socket);
    let log = proc.stderr();
    assert!(
        log.contains(&format!(
            "SET_MEM_TABLE carried {n} regions, more than {MAX_TABLE_REGIONS}"
        )),
        "{log}"
    );
    assert!(proc.terminate().success());
}

/// Requests answered on the second device by a frontend that keeps asking.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: thread::JoinHandle<()>,
}

impl Load {
    fn start(socket: PathBuf) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
            thread::spawn(move || {
                let mut fe = frontend::connect(&socket, 1, 64).expect("second device");
                while !stop.load(Ordering::Relaxed) {
                    let head = fe
                        .add_chain(0, &[(0x10_0000, 16, VIRTQ_DESC_F_WRITE)])
                        .expect("chain");
                    fe.kick(0).expect("kick");
                    let used = fe.wait_used(0, 1, WAIT).expect("the second device answers");
                    assert_eq!(used, vec![(head, 16)]);
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Load {
            stop,
            answered,
            thread,
        }
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Waits until `more` requests past `from` are answered.
    fn wait_past(&self, from: u64, more: u64) {
        let start = Instant::now();
        while self.answered() < from + more {
            assert!(!self.thread.is_finished(), "the second device's load ended");
            assert!(start.elapsed() < WAIT, "the second device stalled");
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the load thread");
    }
}

/// Where the lost part lies.
#[derive(Clone, Copy, Debug)]
enum Lost {
    /// The file keeps the rings (its first 512 KiB); the request's buffer
    /// is at 2 MiB.
    Buffer,
    /// The file is cut to nothing: the rings go too.
    Rings,
}

/// Under `switchboard run` with rng0 and rng1: the frontend of rng0 shrinks
/// its memfd under `lost` and kicks; rng0 fails with the reason, rng1
/// answers throughout, and SIGTERM exits 0.
fn shrink_fails_that_device_alone(lost: Lost) {
    let dir = tempfile::tempdir().expect("tempdir");
    let topology = dir.path().join("topology.json");
    let text = json!({ "devices": [
        { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock" } },
        { "id": "rng1", "kind": "virtio-rng", "vhost_user": { "socket": "rng1.sock" } },
    ] });
    std::fs::write(&topology, text.to_string()).expect("write the topology");
    let (rng0, rng1, ctl_path) = (
        dir.path().join("rng0.sock"),
        dir.path().join("rng1.sock"),
        dir.path().join("ctl.sock"),
    );
    let mut proc = Proc::start(
        dir.path(),
        &[
            "run",
            topology.to_str().expect("utf-8 path"),
            "--control",
            ctl_path.to_str().expect("utf-8 path"),
        ],
        &[&rng0, &rng1, &ctl_path],
    );
    let mut ctl = Client::connect(&ctl_path).expect("control socket");
    let load = Load::start(rng1.clone());
    load.wait_past(0, 10);

    let mut fe = frontend::connect_with(
        &rng0,
        1,
        64,
        frontend::memfd(frontend::MEM_SIZE).expect("memfd"),
    )
    .expect("rng0");
    // It works before the shrink.
    let head = fe
        .add_chain(0, &[(0x10_0000, 16, VIRTQ_DESC_F_WRITE)])
        .expect("chain");
    fe.kick(0).expect("kick");
    assert_eq!(
        fe.wait_used(0, 1, WAIT).expect("answered"),
        vec![(head, 16)]
    );
    match lost {
        Lost::Buffer => {
            fe.file.set_len(0x8_0000).expect("shrink the memfd");
            fe.add_chain(0, &[(0x20_0000, 16, VIRTQ_DESC_F_WRITE)])
                .expect("chain");
        }
        Lost::Rings => {
            fe.add_chain(0, &[(0x10_0000, 16, VIRTQ_DESC_F_WRITE)])
                .expect("chain");
            fe.file.set_len(0).expect("shrink the memfd");
        }
    }
    fe.kick(0).expect("kick");
    // From here the frontend must not touch the part it cut off itself.

    let start = Instant::now();
    let info = loop {
        let info = device(&mut ctl, "rng0").expect("rng0 listed");
        if info["state"] == "stopped" {
            break info;
        }
        proc.assert_alive("after the shrink");
        assert!(start.elapsed() < WAIT, "rng0 did not fail: {info}");
        thread::sleep(Duration::from_millis(10));
    };
    let failure = info["failure"].as_str().unwrap_or_default();
    assert!(
        failure.contains("guest memory region at 0x0 (0x1000000 bytes)")
            && failure.contains("the frontend shrank the file"),
        "{lost:?}: {info}"
    );
    // The other device keeps answering, and is running.
    load.wait_past(load.answered(), 20);
    let other = device(&mut ctl, "rng1").expect("rng1 listed");
    assert_eq!(other["state"], "running", "{other}");
    load.finish();
    drop(fe);
    proc.assert_alive("after the failure");
    one_request(&rng1);
    assert!(proc.terminate().success(), "exit status after SIGTERM");
}

#[test]
fn test_under_run_a_memfd_shrunk_under_a_buffer_fails_that_device_alone() {
    shrink_fails_that_device_alone(Lost::Buffer);
}

#[test]
fn test_under_run_a_memfd_shrunk_under_the_rings_fails_that_device_alone() {
    shrink_fails_that_device_alone(Lost::Rings);
}

/// The one overflow no hook of the backend sees: ADD_MEM_REG's user
/// address (the vhost crate checks it only in SET_MEM_TABLE). The
/// vhost-user-backend crate's translation of a ring address in the region
/// overflows: in a debug build it panics on the connection's thread (the
/// connection ends), in a release build it wraps. Either way the process
/// stays up and serves the next frontend.
#[test]
fn test_add_mem_reg_whose_user_address_overflows_does_not_take_the_process_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, socket) = serve_rng(dir.path());
    let mut fe = frontend::connect(&socket, 1, 64).expect("connect");
    let page = frontend::memfd(0x1000).expect("memfd");
    let user = u64::MAX - 0xfff;
    let _ = fe
        .frontend
        .add_mem_region(&raw_region(0x1_0000_0000, 0x1000, user, 0, &page));
    let config = vhost::VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: user,
        used_ring_addr: user + 0x800,
        avail_ring_addr: user + 0x400,
        log_addr: None,
    };
    let _ = fe.frontend.set_vring_addr(0, &config);
    drop(fe);
    proc.assert_alive("after the overflowing user address");
    one_request(&socket);
    assert!(proc.terminate().success());
}
