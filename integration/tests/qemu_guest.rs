// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A real Linux guest under QEMU against switchboard's vhost-user backends.
//!
//! `integration/qemu/setup.sh` installs QEMU, busybox and the guest kernel
//! when they are missing (the README's test command runs it first; it is run
//! again here, idempotently, so this test also works on its own). These
//! tests never skip: a machine without QEMU fails them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Once};
use std::thread;

use switchboard_devices::rng::Rng;
use switchboard_devices::vhost_user::{serve, StopHandle, VhostUserServer};

fn qemu_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu")
}

fn setup() {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        let out = Command::new(qemu_dir().join("setup.sh"))
            .output()
            .expect("run integration/qemu/setup.sh");
        assert!(
            out.status.success(),
            "setup.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Runs one guest test; returns its HARNESS RESULT line.
fn run_guest(socket: &Path, device: &str, test: &str) -> String {
    let out = Command::new(qemu_dir().join("run-guest.sh"))
        .arg("--socket")
        .arg(socket)
        .args(["--device", device, "--test", test, "--timeout", "300"])
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

#[test]
fn test_linux_guest_reads_hwrng_from_the_switchboard_rng_backend() {
    setup();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("rng.sock");
    let bus = switchboard_integration::start_guest_memory_bus();
    let server =
        VhostUserServer::new(Arc::new(Rng::new(None).expect("rng")), bus, 1).expect("server");
    let stop = StopHandle::default();
    let serving = {
        let (server, socket, stop) = (server.clone(), socket.clone(), stop.clone());
        thread::spawn(move || serve(server, &socket, &stop))
    };
    // Wait for the socket before QEMU dials it.
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(10));
    }
    let result = run_guest(&socket, "rng", "rng");
    assert!(result.contains("ok=1"), "{result}");
    assert!(
        result.contains("current=virtio_rng"),
        "the guest did not use virtio-rng: {result}"
    );
    assert_eq!(server.in_flight(), 0);
    stop.stop();
    serving.join().expect("server thread").expect("serve");
    assert!(!socket.exists(), "socket left behind");
}
