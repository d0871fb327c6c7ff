// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Cross-crate tests and benchmarks of switchboard.
//!
//! The tests live in `tests/` and the benchmarks in `benches/`; this library
//! holds what they share: [`frontend`], a vhost-user test driver built on the
//! `vhost` crate's frontend. See `docs/TESTING.md` for what each test proves.

#![deny(missing_docs)]

pub mod frontend;

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
