// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-rng served over vhost-user, driven by the `vhost` crate's real
//! frontend in process: entropy arrives, memory removal and GET_VRING_BASE
//! wait for requests in flight, malformed chains do not hurt, and the socket
//! takes a new frontend after a disconnect.

use std::thread;
use std::time::{Duration, Instant};

use switchboard_devices::models::rng::Rng;
use switchboard_integration::frontend::{self, region_infos, VIRTQ_DESC_F_WRITE};
use switchboard_integration::{serve_in_process, Served};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

struct Backend {
    served: Served<Rng>,
    _dir: tempfile::TempDir,
}

fn start(rate: Option<u64>) -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = serve_in_process(Rng::new(rate).expect("rng"), 1, dir.path().join("rng.sock"));
    Backend { served, _dir: dir }
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn test_guest_gets_entropy_in_every_writable_buffer() {
    let b = start(None);
    let mut fe = frontend::connect(&b.served.socket, 1, 64).expect("connect");
    let head = fe
        .add_chain(
            0,
            &[
                (0x10_0000, 32, VIRTQ_DESC_F_WRITE),
                (0x20_0000, 48, VIRTQ_DESC_F_WRITE),
            ],
        )
        .expect("chain");
    fe.kick(0).expect("kick");
    let used = fe.wait_used(0, 1, Duration::from_secs(10)).expect("used");
    assert_eq!(used, vec![(head, 80)]);
    let mut a = [0u8; 32];
    let mut c = [0u8; 48];
    fe.mem
        .read_slice(&mut a, GuestAddress(0x10_0000))
        .expect("read");
    fe.mem
        .read_slice(&mut c, GuestAddress(0x20_0000))
        .expect("read");
    assert!(
        a.iter().any(|&x| x != 0) && c.iter().any(|&x| x != 0),
        "buffers not filled"
    );
    assert_ne!(a[..16], c[..16], "the same bytes twice");
    assert!(fe.take_call(0), "guest not signalled");
    b.served.stop.stop();
}

#[test]
fn test_rem_mem_reg_is_acked_only_after_the_request_using_it_completed() {
    // 512 bytes per second: the first request takes the burst, the second
    // waits about a second in the limiter, holding a lease on region 2.
    let b = start(Some(512));
    let mut fe = frontend::connect(&b.served.socket, 1, 64).expect("connect");
    let file2 = tempfile::tempfile().expect("file");
    file2.set_len(1 << 20).expect("size");
    let region2 = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0x4000_0000),
        1 << 20,
        Some(FileOffset::new(file2, 0)),
    )])
    .expect("map region 2");
    let info2 = region_infos(&region2).expect("info").remove(0);
    fe.frontend.add_mem_region(&info2).expect("ADD_MEM_REG");

    fe.add_chain(0, &[(0x10_0000, 512, VIRTQ_DESC_F_WRITE)])
        .expect("chain");
    fe.kick(0).expect("kick");
    fe.wait_used(0, 1, Duration::from_secs(10))
        .expect("first request");
    let head = fe
        .add_chain(0, &[(0x4000_0000, 512, VIRTQ_DESC_F_WRITE)])
        .expect("chain in region 2");
    fe.kick(0).expect("kick");
    until("request in flight", || b.served.server.in_flight() == 1);
    let used_before = fe.used_idx(0).expect("used idx");

    let asked = Instant::now();
    fe.frontend
        .remove_mem_region(&info2)
        .expect("REM_MEM_REG acked");
    let waited = asked.elapsed();
    let used_after = fe.used_idx(0).expect("used idx");
    assert_eq!(
        used_after,
        used_before.wrapping_add(1),
        "the ack came before the request on the removed region wrote its used entry"
    );
    assert!(
        waited >= Duration::from_millis(300),
        "acked after only {waited:?}"
    );
    let used = fe
        .wait_used(0, 1, Duration::from_secs(1))
        .expect("used entry");
    assert_eq!(used, vec![(head, 512)]);
    let mut buf = [0u8; 512];
    region2
        .read_slice(&mut buf, GuestAddress(0x4000_0000))
        .expect("read");
    assert!(
        buf.iter().any(|&x| x != 0),
        "entropy not written before the ack"
    );
    b.served.stop.stop();
}

/// A rate-limited device (1 KiB/s) with three 1 KiB requests kicked, at
/// least two of them in flight.
fn three_rate_limited_requests() -> (Backend, frontend::TestFrontend) {
    let b = start(Some(1024));
    let mut fe = frontend::connect(&b.served.socket, 1, 64).expect("connect");
    for i in 0..3u64 {
        fe.add_chain(0, &[(0x10_0000 + i * 0x1000, 1024, VIRTQ_DESC_F_WRITE)])
            .expect("chain");
    }
    fe.kick(0).expect("kick");
    until("requests in flight", || b.served.server.in_flight() >= 2);
    (b, fe)
}

#[test]
fn test_get_vring_base_waits_for_every_request_in_flight() {
    let (b, fe) = three_rate_limited_requests();
    let base = fe.frontend.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(base, 3, "next avail index");
    assert_eq!(
        fe.used_idx(0).expect("used"),
        3,
        "replied before every used entry was written"
    );
    assert_eq!(b.served.server.in_flight(), 0);
    b.served.stop.stop();
}

#[test]
fn test_reset_device_waits_for_every_request_in_flight_and_the_device_serves_again() {
    let (b, mut fe) = three_rate_limited_requests();
    // RESET_DEVICE is itself a message on the device's control lane: it
    // must wait for the queue's requests, not for itself.
    let (tx, rx) = std::sync::mpsc::channel();
    let reset = std::thread::spawn(move || {
        let r = fe.frontend.reset_device();
        let _ = tx.send(());
        (fe, r)
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("RESET_DEVICE answered within 10 s");
    let (fe, r) = reset.join().expect("reset thread");
    r.expect("RESET_DEVICE");
    assert_eq!(
        fe.used_idx(0).expect("used"),
        3,
        "answered before every used entry was written"
    );
    assert_eq!(b.served.server.in_flight(), 0);
    assert_eq!(
        b.served.server.gate().state(),
        switchboard_runtime::State::Running,
        "a reset device keeps running"
    );
    b.served.stop.stop();
}

#[test]
fn test_malformed_chains_get_an_empty_answer_and_the_backend_stays_up() {
    let b = start(None);
    let mut fe = frontend::connect(&b.served.socket, 1, 64).expect("connect");
    // A buffer far outside guest memory.
    let bad = fe
        .add_chain(0, &[(0x7_0000_0000, 64, VIRTQ_DESC_F_WRITE)])
        .expect("chain");
    // A buffer straddling the end of guest memory.
    let edge = fe
        .add_chain(0, &[(frontend::MEM_SIZE - 16, 64, VIRTQ_DESC_F_WRITE)])
        .expect("chain");
    // A readable buffer after a writable one.
    let order = fe
        .add_chain(
            0,
            &[(0x10_0000, 16, VIRTQ_DESC_F_WRITE), (0x10_1000, 16, 0)],
        )
        .expect("chain");
    let good = fe
        .add_chain(0, &[(0x10_2000, 16, VIRTQ_DESC_F_WRITE)])
        .expect("chain");
    fe.kick(0).expect("kick");
    let used = fe.wait_used(0, 4, Duration::from_secs(10)).expect("used");
    assert_eq!(used, vec![(bad, 0), (edge, 0), (order, 0), (good, 16)]);
    assert_eq!(b.served.settled_in_flight(), 0);
    b.served.stop.stop();
}

#[test]
fn test_socket_accepts_a_new_frontend_after_a_disconnect() {
    let b = start(None);
    for round in 0..3 {
        let mut fe = frontend::connect(&b.served.socket, 1, 64).expect("connect");
        let head = fe
            .add_chain(0, &[(0x10_0000, 8, VIRTQ_DESC_F_WRITE)])
            .expect("chain");
        fe.kick(0).expect("kick");
        let used = fe.wait_used(0, 1, Duration::from_secs(10)).expect("used");
        assert_eq!(used, vec![(head, 8)], "round {round}");
        drop(fe);
    }
    b.served.stop.stop();
}
