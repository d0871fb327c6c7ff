// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A real Linux guest under QEMU against switchboard's vhost-user backends.
//!
//! `integration/qemu/setup.sh` installs QEMU, busybox and the guest kernel
//! when they are missing (the README's test command runs it first; it is run
//! again here, idempotently, so this test also works on its own). These
//! tests never skip: a machine without QEMU fails them.

use std::path::Path;
use std::process::Command;

use switchboard_devices::models::blk::{Blk, BlkOptions};
use switchboard_devices::models::rng::Rng;
use switchboard_integration::qemu::{self, setup};

/// Runs one guest test (with more run-guest.sh arguments); returns its
/// HARNESS RESULT line.
fn run_guest(socket: &Path, device: &str, test: &str, more: &[&str]) -> String {
    let out = Command::new(qemu::dir().join("run-guest.sh"))
        .arg("--socket")
        .arg(socket)
        .args(["--device", device, "--test", test, "--timeout", "300"])
        .args(more)
        .output()
        .expect("run run-guest.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "guest test {test} failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find(|l| l.starts_with("HARNESS RESULT"))
        .unwrap_or_else(|| panic!("no HARNESS RESULT line:\n{stdout}"))
        .to_string()
}

/// A 256 MiB sparse image whose first MiB holds known bytes; returns the
/// md5 of that MiB.
fn make_image(path: &Path) -> String {
    let first = qemu::write_known_image(path, 256 << 20);
    let head = path.with_extension("head");
    std::fs::write(&head, &first).expect("write the first MiB");
    let out = Command::new("md5sum")
        .arg(&head)
        .output()
        .expect("run md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("md5sum output")
        .to_string()
}

#[test]
fn test_linux_guest_writes_and_reads_back_a_pattern_on_switchboard_blk() {
    setup();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let pre_md5 = make_image(&image);
    // Two queues on two workers, and a guest with two vCPUs: the guest
    // driver uses both queues.
    let blk = Blk::open(
        &image,
        &BlkOptions {
            queues: 2,
            serial: Some("switchboard-test".into()),
            ..BlkOptions::default()
        },
    )
    .expect("open image");
    let served = switchboard_integration::serve_in_process(blk, 2, dir.path().join("blk.sock"));
    let guest_dir = dir.path().join("rw");
    let result = run_guest(
        &served.socket,
        "blk",
        "blk-rw",
        &[
            "--smp",
            "2",
            "--dev-opts",
            "num-queues=2",
            "--dir",
            &guest_dir.display().to_string(),
        ],
    );
    assert!(
        result.contains("ok=1") && result.contains("bad=0"),
        "{result}"
    );
    let serial = std::fs::read_to_string(guest_dir.join("serial.log")).expect("serial log");
    let geometry = serial
        .lines()
        .find(|l| l.contains("HARNESS INFO blk dev="))
        .unwrap_or_else(|| panic!("no geometry line:\n{serial}"));
    for want in ["sectors=524288", "ro=0", "lbs=512", "mq=2"] {
        assert!(geometry.contains(want), "{want} not in {geometry}");
    }
    assert!(
        !geometry.contains("discard_max=0"),
        "no discard: {geometry}"
    );
    assert!(
        serial.contains(&format!("blk-pre off=0 len=1048576 md5={pre_md5}")),
        "the guest read the image's first MiB wrong (host md5 {pre_md5}):\n{serial}"
    );
    // The host check: every chunk the guest wrote is in the image file.
    let out = Command::new(qemu::dir().join("check-image.sh"))
        .arg(guest_dir.join("serial.log"))
        .arg(&image)
        .output()
        .expect("run check-image.sh");
    assert!(
        out.status.success(),
        "check-image.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    served.finish();
}

#[test]
fn test_blk_survives_device_del_and_serves_the_device_plugged_back() {
    setup();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    make_image(&image);
    let blk = Blk::open(&image, &BlkOptions::default()).expect("open image");
    let served = switchboard_integration::serve_in_process(blk, 1, dir.path().join("blk.sock"));
    // QMP device_del (SET_VRING_ENABLE 0 and GET_VRING_BASE, connection
    // kept), chardev-remove (disconnect), then chardev-add and device_add:
    // a new connection on the same socket, and the guest sees the disk again.
    let out = Command::new(qemu::dir().join("hotunplug.sh"))
        .arg(&served.socket)
        .args([
            "blk",
            "--replug",
            "--dev-opts",
            "num-queues=1",
            "--timeout",
            "300",
        ])
        .output()
        .expect("run hotunplug.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hotunplug.sh failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("DEVICE_DELETED"), "{stdout}");
    assert!(
        stdout.contains("gone_seen=1"),
        "the guest never lost the disk:\n{stdout}"
    );
    assert!(
        stdout
            .lines()
            .filter(|l| l.contains("HARNESS EVENT") && l.contains("block=vda"))
            .count()
            >= 1,
        "the guest never got the disk back:\n{stdout}"
    );
    served.finish();
}

#[test]
fn test_linux_guest_reads_hwrng_from_the_switchboard_rng_backend() {
    setup();
    let dir = tempfile::tempdir().expect("tempdir");
    let served = switchboard_integration::serve_in_process(
        Rng::new(None).expect("rng"),
        1,
        dir.path().join("rng.sock"),
    );
    let socket = served.socket.clone();
    let result = run_guest(&socket, "rng", "rng", &[]);
    assert!(result.contains("ok=1"), "{result}");
    assert!(
        result.contains("current=virtio_rng"),
        "the guest did not use virtio-rng: {result}"
    );
    served.finish();
}
