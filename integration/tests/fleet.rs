// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Many devices in one process (`switchboard run`'s fleet), driven by the
//! `vhost` crate's real frontend: removing a disk while it has I/O in
//! flight answers only after every request was answered, while a second
//! disk keeps serving; a second removal waits for the same drain; a disk
//! added at runtime serves a new frontend.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use switchboard_devices::host::fleet::Fleet;
use switchboard_devices::host::topology::{BlkSpec, DeviceSpec, RngSpec, TestDeviceSpec, UartSpec};
use switchboard_devices::host::topology::{BusId, Output, VhostUserSpec};
use switchboard_devices::models::blk::BlkOptions;
use switchboard_integration::frontend::{self, TestFrontend, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use switchboard_runtime::{BusAddr, DeviceId};

const WAIT: Duration = Duration::from_secs(20);

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(8 << 20))
        .expect("image");
    p
}

fn vhost_user(socket: PathBuf) -> VhostUserSpec {
    VhostUserSpec::new(socket, 1)
}

/// A disk, and the options to open it with: reads and writes take
/// `latency` more.
fn blk(dir: &Path, id: &str, latency: Duration) -> (BlkSpec, BlkOptions) {
    let spec = BlkSpec {
        id: DeviceId::new(id),
        path: image(dir, &format!("{id}.img")),
        read_only: false,
        serial: None,
        vhost_user: vhost_user(dir.join(format!("{id}.sock"))),
    };
    let options = BlkOptions {
        latency,
        io_threads: 2,
        ..spec.blk_options()
    };
    (spec, options)
}

fn test_device(id: &str, bus: &str, addr: u64, read_delay_us: u64) -> DeviceSpec {
    DeviceSpec::TestDevice(TestDeviceSpec {
        id: DeviceId::new(id),
        bus: BusId::new(bus),
        addr: BusAddr(addr),
        read_delay_us,
    })
}

/// One write then a read-back of it on `fe`, checked.
fn round_trip(fe: &mut TestFrontend, sector: u64, seed: u8) {
    let data = vec![seed; 512];
    fe.push_blk(0, 0, VIRTIO_BLK_T_OUT, sector, &data, false)
        .expect("write");
    fe.kick(0).expect("kick");
    fe.wait_used(0, 1, WAIT).expect("write answered");
    assert_eq!(fe.blk_status(0).expect("status"), 0);
    fe.push_blk(0, 1, VIRTIO_BLK_T_IN, sector, &[0u8; 512], true)
        .expect("read");
    fe.kick(0).expect("kick");
    fe.wait_used(0, 1, WAIT).expect("read answered");
    assert_eq!(fe.blk_status(1).expect("status"), 0);
    assert_eq!(fe.blk_data(1, 512).expect("data"), data);
}

#[test]
fn test_removing_a_disk_with_io_in_flight_waits_for_it_while_another_disk_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = Arc::new(Fleet::new().expect("fleet"));
    let slow = blk(dir.path(), "disk0", Duration::from_millis(100));
    let fast = blk(dir.path(), "disk1", Duration::ZERO);
    fleet.add_blk(&slow.0, &slow.1).expect("add disk0");
    fleet.add_blk(&fast.0, &fast.1).expect("add disk1");
    let mut fe0 = frontend::connect(&dir.path().join("disk0.sock"), 1, 64).expect("connect 0");
    let mut fe1 = frontend::connect(&dir.path().join("disk1.sock"), 1, 64).expect("connect 1");
    round_trip(&mut fe1, 1, 1);

    // Eight slow reads in flight on disk0 (two I/O threads, 100 ms each:
    // about 400 ms of work).
    for n in 0..8 {
        fe0.push_blk(0, n, VIRTIO_BLK_T_IN, n, &[0u8; 512], true)
            .expect("read");
    }
    fe0.kick(0).expect("kick");
    let started = Instant::now();
    while fleet
        .query()
        .iter()
        .find(|d| d.id == "disk0")
        .map(|d| d.in_flight)
        != Some(8)
    {
        assert!(started.elapsed() < WAIT, "requests never in flight");
        thread::sleep(Duration::from_millis(1));
    }

    let removing = {
        let fleet = Arc::clone(&fleet);
        thread::spawn(move || fleet.remove("disk0"))
    };
    let second = {
        let fleet = Arc::clone(&fleet);
        thread::spawn(move || {
            // Arrives while the first removal drains.
            thread::sleep(Duration::from_millis(50));
            fleet.remove("disk0")
        })
    };
    // disk1 keeps serving during the drain.
    let mut during = 0;
    while !removing.is_finished() {
        round_trip(&mut fe1, 2 + during % 100, during as u8);
        during += 1;
    }
    let drain = removing.join().expect("thread").expect("remove disk0");
    assert_eq!(
        fe0.used_idx(0).expect("used"),
        8,
        "the removal answered before every request in flight was answered"
    );
    for n in 0..8 {
        assert_eq!(fe0.blk_status(n).expect("status"), 0, "request {n}");
    }
    assert!(drain >= Duration::from_millis(200), "drained in {drain:?}");
    let again = second.join().expect("thread").expect("second removal");
    assert_eq!(again, drain, "the second removal got another drain");
    assert!(during > 0, "disk1 was not used during the drain");
    assert!(
        !dir.path().join("disk0.sock").exists(),
        "socket left behind"
    );
    assert!(fleet.remove("disk0").is_err(), "removed twice");

    // disk1 after: still serving, and the fleet lists only it.
    round_trip(&mut fe1, 500, 0x55);
    let ids: Vec<String> = fleet.query().into_iter().map(|d| d.id).collect();
    assert_eq!(ids, vec!["disk1".to_string()]);

    // A disk added at runtime serves a new frontend.
    let added = blk(dir.path(), "disk2", Duration::ZERO);
    fleet.add_blk(&added.0, &added.1).expect("add disk2");
    assert!(
        fleet.add_blk(&added.0, &added.1).is_err(),
        "duplicate id accepted"
    );
    let mut fe2 = frontend::connect(&dir.path().join("disk2.sock"), 1, 64).expect("connect 2");
    round_trip(&mut fe2, 7, 0x77);
    let info = fleet.query();
    let d2 = info.iter().find(|d| d.id == "disk2").expect("disk2 listed");
    assert_eq!((d2.state.as_str(), d2.kind), ("running", "virtio-blk"));
    assert_eq!(d2.handled, 2);

    drop(fe1);
    drop(fe2);
    for (id, r) in fleet.remove_all() {
        r.unwrap_or_else(|e| panic!("remove {id}: {e}"));
    }
    assert!(fleet.is_empty());
}

#[test]
fn test_mmio_devices_and_vhost_user_devices_share_a_fleet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = Fleet::new().expect("fleet");
    fleet.add_bus("pio0").expect("bus");
    fleet
        .add(&DeviceSpec::Uart16550(UartSpec {
            id: DeviceId::new("com1"),
            bus: BusId::new("pio0"),
            addr: BusAddr(0x3f8),
            output: Output::Null,
        }))
        .expect("uart");
    fleet
        .add(&test_device("slow0", "pio0", 0x1000, 1000))
        .expect("test device");
    fleet
        .add(&DeviceSpec::VirtioRng(RngSpec {
            id: DeviceId::new("rng0"),
            rate_limit: None,
            vhost_user: vhost_user(dir.path().join("rng.sock")),
        }))
        .expect("rng");
    let err = fleet
        .add(&test_device("slow1", "nope", 0, 0))
        .expect_err("unknown bus");
    assert!(err.to_string().contains("nope"), "{err}");

    let bus = fleet.bus("pio0").expect("bus handle");
    let me = switchboard_runtime::ActorId::new("test");
    let id = futures::executor::block_on(bus.read(
        &me,
        switchboard_runtime::BusAddr(0x1000),
        switchboard_runtime::AccessSize::B8,
    ))
    .expect("read the test device");
    assert_eq!(
        id,
        switchboard_runtime::AccessReply::Read {
            value: switchboard_devices::models::slow::SLOW_ID
        }
    );
    let info = fleet.query();
    let slow = info.iter().find(|d| d.id == "slow0").expect("listed");
    assert_eq!((slow.state.as_str(), slow.handled), ("running", 1));
    assert_eq!(slow.at, "bus pio0 @ 0x1000");
    fleet.remove("slow0").expect("remove");
    let after = futures::executor::block_on(bus.read(
        &me,
        switchboard_runtime::BusAddr(0x1000),
        switchboard_runtime::AccessSize::B8,
    ))
    .expect("read after removal");
    assert_eq!(
        after,
        switchboard_runtime::AccessReply::Read { value: u64::MAX },
        "the removed device still answers"
    );
    for (id, r) in fleet.remove_all() {
        r.unwrap_or_else(|e| panic!("remove {id}: {e}"));
    }
}
