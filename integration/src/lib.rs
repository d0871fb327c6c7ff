// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Cross-crate tests and benchmarks of switchboard.
//!
//! The tests live in `tests/` and the benchmarks in `benches/`; this library
//! holds what they share: [`frontend`], a vhost-user test driver built on the
//! `vhost` crate's frontend; with the `fuzzing` feature, `fuzzing`, the
//! fuzz targets' entry points. See `docs/TESTING.md` for what each test proves.

#![deny(missing_docs)]

pub mod frontend;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod process;
pub mod qemu;

/// A finished command's stdout and stderr, one after the other (for
/// assertions and failure messages).
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `switchboard` binary of this build profile, built (or brought up
/// to date) on first use: tests that drive the real command call this.
pub fn switchboard_bin() -> std::path::PathBuf {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        // The test executable is target/<profile>/deps/<name>.
        let exe = std::env::current_exe().expect("the test's own path");
        let profile_dir = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let mut build = std::process::Command::new(env!("CARGO"));
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "switchboard-cli",
                "--bin",
                "switchboard",
            ])
            .env("CARGO_TARGET_DIR", &target_dir);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of the switchboard binary failed"
        );
        profile_dir.join("switchboard")
    })
    .clone()
}

/// Starts an actix system on a thread of its own with a guest-memory bus on
/// it, as a vhost-user server needs; the system runs until the process ends.
pub fn start_guest_memory_bus() -> switchboard_bus::BusHandle {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            let bus = switchboard_bus::BusHandle::start(
                &switchboard_runtime::Runtime::new(),
                "guest-mem",
                &actix::Arbiter::current(),
            );
            // The receiver waits for exactly this message.
            let _ = tx.send(bus);
            futures::future::pending::<()>().await;
        });
    });
    rx.recv().expect("the actor thread starts the bus")
}

/// A virtio device served over vhost-user in this process, on a socket, as
/// the tests use it. Stops serving when dropped.
pub struct Served<D: switchboard_devices::models::virtio::VirtioDevice> {
    /// The server (in-flight and handled counters, the device).
    pub server: switchboard_devices::vhost_user::VhostUserServer<D>,
    /// The socket it listens on.
    pub socket: std::path::PathBuf,
    /// Stops it.
    pub stop: switchboard_devices::vhost_user::StopHandle,
    serving: Option<std::thread::JoinHandle<switchboard_devices::vhost_user::Result<()>>>,
}

impl<D: switchboard_devices::models::virtio::VirtioDevice> std::fmt::Debug for Served<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("socket", &self.socket)
            .finish()
    }
}

/// Serves `device` on `socket` with its queues on `workers` threads and
/// its guest memory on a bus of its own; returns once the socket exists.
pub fn serve_in_process<D: switchboard_devices::models::virtio::VirtioDevice>(
    device: D,
    workers: usize,
    socket: std::path::PathBuf,
) -> Served<D> {
    use switchboard_devices::vhost_user::{serve, StopHandle, VhostUserServer};
    let server = VhostUserServer::new(
        std::sync::Arc::new(device),
        start_guest_memory_bus(),
        workers,
    )
    .expect("vhost-user server");
    let stop = StopHandle::default();
    let serving = {
        let (server, socket, stop) = (server.clone(), socket.clone(), stop.clone());
        std::thread::spawn(move || serve(server, &socket, &stop))
    };
    let start = std::time::Instant::now();
    while !socket.exists() && start.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Served {
        server,
        socket,
        stop,
        serving: Some(serving),
    }
}

impl<D: switchboard_devices::models::virtio::VirtioDevice> Served<D> {
    /// The requests in flight once every admission that is ending has
    /// ended: a frontend sees a request's used entry before the server has
    /// recorded it and dropped its admission (see `finish` in the server's
    /// `walk.rs`), so this waits up to 10 s for the count to reach zero.
    pub fn settled_in_flight(&self) -> u64 {
        let _ = self.server.gate().wait_idle(
            switchboard_runtime::gate::Lanes::All,
            Some(std::time::Duration::from_secs(10)),
        );
        self.server.in_flight()
    }

    /// Stops serving; asserts that nothing was left in flight (see
    /// [`Served::settled_in_flight`]), that serving ended without an error
    /// and that the socket file is gone.
    pub fn finish(mut self) {
        assert_eq!(self.settled_in_flight(), 0, "requests left in flight");
        self.stop.stop();
        if let Some(t) = self.serving.take() {
            t.join().expect("server thread").expect("serve");
        }
        assert!(!self.socket.exists(), "socket left behind");
    }
}

impl<D: switchboard_devices::models::virtio::VirtioDevice> Drop for Served<D> {
    fn drop(&mut self) {
        self.stop.stop();
    }
}
