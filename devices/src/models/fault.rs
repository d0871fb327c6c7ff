// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-fault: a fault-injection test device that panics on request.
//!
//! **For testing only.** It exists to show panic containment (a device that
//! panics fails alone, its in-flight requests are still answered, its
//! frontend is disconnected, the supervisor is told, and every other device
//! keeps serving); it is never useful in a real VM.
//!
//! To a frontend it is an entropy device (virtio device type 4, one queue,
//! no features), so anything that drives a virtio-rng (QEMU's
//! `vhost-user-rng-pci`, the test frontend) drives it. Its answers are not
//! random: every writable byte of request `n` (counted from 1) is `n` modulo
//! 256, so a test can tell which answer it got.
//!
//! # The schedule
//!
//! With `panic_after` N and `hold` H (H at most N), counting requests in
//! the order the device gets them:
//!
//! - requests 1 to N − H are answered at once;
//! - requests N − H + 1 to N are kept unanswered: they stay in flight;
//! - request N + 1 panics, while the device holds it and the H requests it
//!   kept. With [`PanicIn::Handle`] the panic is in
//!   [`VirtioDevice::handle`], on the queue worker; with
//!   [`PanicIn::IoThread`] every request is handed to the device's own I/O
//!   thread, which answers, keeps and panics there, like a device whose
//!   completions come from a thread pool (virtio-blk's I/O threads).
//!
//! The panic unwinds through the requests the device holds: each is dropped
//! unanswered, and its drop guard answers it with the device's
//! [`VirtioDevice::fail_status`] (`fail_status` in its last writable byte,
//! a used length of 1) if one is configured, or else with an empty answer
//! (a used length of 0). The queue worker's panic is caught by the
//! vhost-user server; the I/O thread catches its own, as every thread a
//! device owns must, and fails the device through the gate of the request
//! it was running ([`Request::gate`]). From then on the I/O thread answers
//! nothing itself: each request still reaching it is dropped, and answered
//! by its guard.
//!
//! A device that holds requests and never gets request N + 1 keeps them in
//! flight: like any device that never answers, it then holds up a
//! GET_VRING_BASE, the drain after a disconnect, and its removal.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use switchboard_runtime::panic_message;

use crate::models::rng::VIRTIO_ID_RNG;
use crate::models::virtio::{Completer, Handled, Request, VirtioDevice};

/// The device kind, as in a topology file and in logs.
pub const KIND: &str = "virtio-fault";

/// Why a message log cannot replay a fault device.
pub const NOT_REPLAYABLE: &str =
    "virtio-fault is a fault-injection test device: its requests are recorded, but it cannot \
     be replayed";

/// Bytes written per answer at most (as virtio-rng).
const MAX_FILL: u64 = 64 * 1024;

/// The most requests a fault device may hold: one fewer than its queue
/// size, so that the request that panics still fits in the ring.
pub const MAX_HOLD: u16 = 255;

// These docs are plain text: the topology schema shows them.
/// Where a fault device panics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PanicIn {
    /// In the device's request handler, on the queue worker.
    #[default]
    Handle,
    /// On the device's own I/O thread, which every request is handed to.
    IoThread,
}

impl PanicIn {
    /// The name, as in a topology file.
    pub fn name(self) -> &'static str {
        match self {
            PanicIn::Handle => "handle",
            PanicIn::IoThread => "io-thread",
        }
    }
}

/// What a [`FaultDevice`] does (see the [module documentation](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultConfig {
    /// Requests before the one that panics.
    pub panic_after: u64,
    /// How many of those (the last ones) are kept unanswered until the
    /// panic; at most `panic_after` and at most [`MAX_HOLD`].
    pub hold: u16,
    /// Where the panic happens.
    pub panic_in: PanicIn,
    /// The status byte a request answered by its drop guard (or refused by
    /// a failed device) gets in its last writable byte; `None` answers it
    /// with nothing written.
    pub fail_status: Option<u8>,
}

/// The request counter and the requests kept, shared by the device and its
/// I/O thread.
#[derive(Debug)]
struct Schedule {
    config: FaultConfig,
    /// Requests seen so far.
    seen: AtomicU64,
    /// Requests kept unanswered. Only the panic takes them out: it moves them
    /// into its own frame, so the unwind drops them and their drop guards
    /// answer them.
    held: Mutex<Vec<Request>>,
}

/// What the schedule did with a request.
enum Step {
    /// Answer it now with this length.
    Answer(Request, u32),
    /// Kept until the panic.
    Held,
}

impl Schedule {
    fn held(&self) -> MutexGuard<'_, Vec<Request>> {
        // A push or a take is one step: a panic cannot leave it half done.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers, keeps or panics on one request; `on` names the thread.
    fn step(&self, mut request: Request, on: &str) -> Step {
        let n = self.seen.fetch_add(1, Ordering::AcqRel) + 1;
        let FaultConfig {
            panic_after, hold, ..
        } = self.config;
        if n == panic_after.saturating_add(1) {
            let held = std::mem::take(&mut *self.held());
            // The unwind drops `held`, then `request`: every one of them
            // is answered by its drop guard.
            panic!(
                "{KIND}: injected panic on request {n} ({on}), with {} more requests held",
                held.len()
            );
        }
        if n <= panic_after && n > panic_after - u64::from(hold).min(panic_after) {
            self.held().push(request);
            return Step::Held;
        }
        request.set_kind("fill");
        let len = request.writable_len().min(MAX_FILL);
        let bytes = vec![n as u8; len as usize];
        match request.write_at(0, &bytes) {
            Ok(()) => Step::Answer(request, len as u32),
            Err(e) => {
                tracing::warn!(error = %e, "write the answer to the guest");
                Step::Answer(request, 0)
            }
        }
    }
}

/// The fault-injection test device (see the [module documentation](self)).
///
/// ```
/// use switchboard_devices::models::fault::{FaultConfig, FaultDevice, PanicIn};
/// use switchboard_devices::models::virtio::VirtioDevice;
///
/// // Answers requests 1 and 2, holds 3 and 4, and panics on 5 on its own
/// // thread; the requests it holds then get status 0xee.
/// let dev = FaultDevice::new(FaultConfig {
///     panic_after: 4,
///     hold: 2,
///     panic_in: PanicIn::IoThread,
///     fail_status: Some(0xee),
/// })?;
/// assert_eq!(dev.device_type(), 4, "an entropy device to the frontend");
/// assert_eq!(dev.fail_status(), Some(0xee));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct FaultDevice {
    schedule: Arc<Schedule>,
    /// The I/O thread's queue, for [`PanicIn::IoThread`]. The thread holds
    /// the receiver and ends when this sender is dropped with the device;
    /// requests still queued then are dropped, and answered by their guards.
    io: Option<Mutex<crossbeam_channel::Sender<(Request, Completer)>>>,
}

impl FaultDevice {
    /// A fault device doing what `config` says; starts its I/O thread for
    /// [`PanicIn::IoThread`].
    pub fn new(config: FaultConfig) -> std::io::Result<Self> {
        let schedule = Arc::new(Schedule {
            config,
            seen: AtomicU64::new(0),
            held: Mutex::default(),
        });
        let io = match config.panic_in {
            PanicIn::Handle => None,
            PanicIn::IoThread => {
                let (tx, rx) = crossbeam_channel::unbounded();
                let schedule = Arc::clone(&schedule);
                thread::Builder::new()
                    .name("virtio-fault-io".into())
                    .spawn(move || io_thread(&schedule, rx))?;
                Some(Mutex::new(tx))
            }
        };
        Ok(FaultDevice { schedule, io })
    }

    /// What the device does.
    pub fn config(&self) -> &FaultConfig {
        &self.schedule.config
    }

    /// Requests the device has got so far.
    pub fn seen(&self) -> u64 {
        self.schedule.seen.load(Ordering::Acquire)
    }

    /// Requests it holds unanswered now.
    pub fn held(&self) -> usize {
        self.schedule.held().len()
    }
}

/// The I/O thread of a [`PanicIn::IoThread`] device: runs the schedule on
/// every request and answers through its completer; catches its panic and
/// fails the device through the gate of the request that panicked.
fn io_thread(schedule: &Schedule, rx: crossbeam_channel::Receiver<(Request, Completer)>) {
    let mut failed = false;
    for (request, done) in rx {
        if failed {
            // A failed device answers nothing itself: the drop guard
            // answers with the failure status.
            drop(request);
            continue;
        }
        let gate = request.gate().cloned();
        match catch_unwind(AssertUnwindSafe(|| schedule.step(request, "I/O thread"))) {
            Ok(Step::Answer(request, len)) => done.complete(request, len),
            Ok(Step::Held) => {}
            Err(p) => {
                failed = true;
                let reason = format!("I/O thread: {}", panic_message(p.as_ref()));
                match gate {
                    Some(g) => {
                        g.fail(reason);
                    }
                    None => tracing::error!(%reason, "panic on a request no gate admitted"),
                }
            }
        }
    }
}

impl VirtioDevice for FaultDevice {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn num_queues(&self) -> usize {
        1
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn fail_status(&self) -> Option<u8> {
        self.schedule.config.fail_status
    }

    fn rebuild_info(&self) -> Result<serde_json::Value, String> {
        Err(NOT_REPLAYABLE.to_string())
    }

    fn handle(&self, request: Request, done: &Completer) -> Handled {
        match &self.io {
            None => match self.schedule.step(request, "queue worker") {
                Step::Answer(request, len) => Handled::Done { request, len },
                Step::Held => Handled::Pending,
            },
            Some(tx) => {
                let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
                match tx.send((request, done.clone())) {
                    Ok(()) => Handled::Pending,
                    Err(crossbeam_channel::SendError((request, _))) => {
                        tracing::error!("virtio-fault I/O thread is gone");
                        Handled::Done { request, len: 0 }
                    }
                }
            }
        }
    }

    fn reset(&self) {
        // Called with nothing in flight, so normally there is nothing to
        // drop; any request still here is answered by its guard.
        self.schedule.held().clear();
    }
}

#[cfg(test)]
mod tests {
    use switchboard_runtime::recording::DataMode;

    use super::*;
    use crate::models::virtio::{Replayed, Trace};

    /// A request with one writable buffer of `len` bytes and no guest
    /// memory behind it: its writes are kept for [`Request::replayed`].
    fn request(head: u16, len: u32) -> Request {
        Request::replay(0, head, &[], &[len], Trace::default(), DataMode::Value)
    }

    fn written(mut request: Request) -> Vec<u8> {
        let Some(Replayed { trace, .. }) = request.replayed() else {
            panic!("not a replayed request");
        };
        let Some(switchboard_runtime::recording::Data::Bytes(b)) =
            trace.writes.first().map(|w| w.data.clone())
        else {
            panic!("no bytes written: {trace:?}");
        };
        b
    }

    fn device(panic_after: u64, hold: u16) -> FaultDevice {
        FaultDevice::new(FaultConfig {
            panic_after,
            hold,
            ..FaultConfig::default()
        })
        .expect("device")
    }

    #[test]
    fn test_answers_then_holds_then_panics_with_the_held_requests_dropped() {
        let dev = device(4, 2);
        let done = Completer::new(|_, _| panic!("answered through the completer"));
        for head in 0..2u16 {
            match dev.handle(request(head, 8), &done) {
                Handled::Done { request, len } => {
                    assert_eq!(len, 8);
                    assert_eq!(written(request), vec![head as u8 + 1; 8]);
                }
                Handled::Pending => panic!("request {head} held"),
            }
        }
        for head in 2..4u16 {
            assert!(matches!(
                dev.handle(request(head, 8), &done),
                Handled::Pending
            ));
        }
        assert_eq!(dev.held(), 2);
        let panicked = catch_unwind(AssertUnwindSafe(|| dev.handle(request(4, 8), &done)));
        let message = panic_message(panicked.expect_err("request 5 panics").as_ref());
        assert!(
            message.contains("injected panic on request 5 (queue worker)"),
            "{message}"
        );
        assert_eq!(dev.held(), 0, "the held requests were not dropped");
        assert_eq!(dev.seen(), 5);
    }

    #[test]
    fn test_hold_is_capped_by_panic_after() {
        let dev = device(1, 3);
        let done = Completer::new(|_, _| {});
        assert!(matches!(dev.handle(request(0, 4), &done), Handled::Pending));
        assert!(catch_unwind(AssertUnwindSafe(|| dev.handle(request(1, 4), &done))).is_err());
    }

    #[test]
    fn test_panic_after_zero_panics_on_the_first_request() {
        let dev = device(0, 0);
        let done = Completer::new(|_, _| {});
        assert!(catch_unwind(AssertUnwindSafe(|| dev.handle(request(0, 4), &done))).is_err());
    }

    #[test]
    fn test_io_thread_answers_through_the_completer() {
        let dev = FaultDevice::new(FaultConfig {
            panic_after: 10,
            panic_in: PanicIn::IoThread,
            fail_status: Some(0xee),
            ..FaultConfig::default()
        })
        .expect("device");
        assert_eq!(dev.fail_status(), Some(0xee));
        let (tx, rx) = crossbeam_channel::unbounded();
        let done = Completer::new(move |request, len| {
            let _ = tx.send((request, len));
        });
        assert!(matches!(dev.handle(request(0, 3), &done), Handled::Pending));
        let (request, len) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("answered");
        assert_eq!(len, 3);
        assert_eq!(written(request), vec![1; 3]);
    }
}
