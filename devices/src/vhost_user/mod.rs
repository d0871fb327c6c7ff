// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Serving a [`VirtioDevice`] as a vhost-user backend.
//!
//! [`VhostUserServer`] implements `vhost_user_backend::VhostUserBackend` and
//! closes the two gaps the crate leaves (see the repository's DESIGN):
//!
//! - **Memory removal is acknowledged only once drained.** The frontend's
//!   memory table is mirrored onto a guest-memory bus (`switchboard-bus`):
//!   every region becomes a RAM region there, and requests reach guest
//!   buffers only through leases on those regions. When a region leaves the
//!   table (REM_MEM_REG, or a SET_MEM_TABLE without it), `update_memory`
//!   removes it from the bus and blocks until its last lease is returned,
//!   so the acknowledgement the crate sends afterwards is true.
//! - **GET_VRING_BASE, RESET_DEVICE and a disconnect drain the queue.**
//!   Every popped request is admitted on its queue's lane of the device's
//!   [`Gate`] (the one model of `switchboard-runtime`: a sequence number,
//!   counted in flight, refused while the device is not running) and holds
//!   its ticket until its used entry is written. `stop_vring`
//!   (GET_VRING_BASE) waits for the queue's lane to reach zero before the
//!   crate reads the ring position and replies; `reset_device` and [`serve`]
//!   after a disconnect wait for every queue.
//!
//! - **A frontend's memory table is not trusted.** `update_memory` checks
//!   every new region against its file and the table against the slot
//!   limits before anything reads it, and refuses a bad one (see
//!   `memory.rs`); the mappings of files that can shrink are registered
//!   with a process-wide SIGBUS handler that turns a fault in one into the
//!   failure of this device alone (see `sigbus.rs`). The ring walker reads
//!   only the table the server accepted.
//!
//! A panic in the device, on any of its threads, fails that device alone:
//! see [`VhostUserServer::fail`] and `runtime/DESIGN.md`, which documents
//! the whole request path and the drain path.
//!
//! # Threads
//!
//! - The vhost-user thread (owned by the crate) handles the socket; it is
//!   the only caller of `update_memory`, `stop_vring` and `reset_device`, and
//!   it is the thread that blocks while draining.
//! - One worker thread per entry of `queues_per_thread` (the crate's epoll
//!   loops) walks the rings of its queues on a kick and calls the device on
//!   the same thread: no thread hop between the kick and the device's
//!   request handling, and no message per request.
//! - A device that answers later sends the request back through its
//!   [`Completer`], from any thread: the request goes on the worker's
//!   completion channel and the worker's completion eventfd is written; the
//!   worker wakes, writes the used entries, drops the requests (returning
//!   their leases) and signals the guest.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use switchboard_bus::{BusHandle, Placement, RamRegion, RegionId, RegionKind, RegionSpec, Target};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use actix::Recipient;
use switchboard_runtime::journal::Journal;
use switchboard_runtime::recording::{DataMode, Entry, RecordKind, Until};
use switchboard_runtime::{
    panic_message, DeviceFailed, DeviceId, Gate, GateDrainError, Lanes, MessageKind, Pending,
    Refused, Runtime, State, Ticket,
};

use crate::models::virtio::{actor_info, config_window, Completer, Request, VirtioDevice};

mod codec;
mod filter;
// The in-flight file's mapping: its mmap and the atomic views into it.
mod inflight;
pub(crate) mod listen;
mod memory;
mod serve;
mod walk;
// The SIGBUS handler and its registry: the only unsafe code of the
// serving layer (libc's sigaction and mmap), kept to this one module.
#[allow(unsafe_code)]
mod sigbus;
pub use codec::{encode_json as encode_body, render as render_body};
pub(crate) use codec::{RequestPayload, RequestReply};
pub use memory::{MAX_MEM_SLOTS, MAX_TABLE_REGIONS};
pub use serve::{
    bind, check_socket_path, default_workers, serve, serve_bound, serve_listener, serve_on,
    serve_unix_listener, BoundSocket, StopHandle,
};

/// Virtio 1.0 compliance (virtio 1.2, 6).
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Indirect descriptors (virtio 1.2, 2.7.5.3).
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Used/avail event index (virtio 1.2, 2.7.10).
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// vhost-user: the protocol-features negotiation (vhost-user spec).
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Errors of the vhost-user server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating an eventfd failed.
    #[error("Create the completion eventfd")]
    CreateEventFd(#[source] io::Error),
    /// Installing the process's SIGBUS handler (which contains a frontend
    /// shrinking its memory's file) failed.
    #[error("Install the SIGBUS handler for guest memory")]
    InstallSigbus(#[source] io::Error),
    /// Creating the daemon failed. (The crate's error type does not
    /// implement `std::error::Error`, so its text is kept instead.)
    #[error("Create the vhost-user daemon for {kind}: {reason}")]
    CreateDaemon {
        /// Device kind.
        kind: &'static str,
        /// Why.
        reason: String,
    },
    /// Registering the completion eventfd with a worker failed.
    #[error("Register the completion eventfd with worker {worker}")]
    RegisterCompletion {
        /// The worker.
        worker: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Listening on the socket failed.
    #[error("Listen on {path}")]
    Listen {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// Accepting or serving a frontend failed.
    #[error("Serve a frontend on {path}: {reason}")]
    Serve {
        /// The socket path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The socket path exists and is not a socket.
    #[error("{path} exists and is not a socket")]
    NotASocket {
        /// The path.
        path: String,
    },
    /// Another process is listening on the socket path.
    #[error("{path} is a socket another process is listening on")]
    SocketInUse {
        /// The path.
        path: String,
    },
    /// The socket path could not be inspected.
    #[error("Inspect {path}")]
    InspectSocket {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Result of the vhost-user server.
pub type Result<T> = std::result::Result<T, Error>;

/// How long a queue drain waits at most once the device is stopping (or
/// failed): past it, the drain reports what is still pending and the stop
/// goes on.
pub const STOP_DEADLINE: Duration = Duration::from_secs(3);

/// **Test only**: when this environment variable is set, in-flight
/// tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) is not advertised.
pub const NO_INFLIGHT_ENV: &str = "SWITCHBOARD_TEST_NO_INFLIGHT";

/// How the failure reason of a device stopped by its drain deadline begins.
pub const DRAIN_DEADLINE_PASSED: &str = "drain deadline passed: ";

/// One worker's completion path.
struct Completions {
    rx: crossbeam_channel::Receiver<(Request, u32)>,
    event: Arc<EventFd>,
    /// Set by the first completion after the worker's last drain; that
    /// completion writes `event`.
    armed: Arc<AtomicBool>,
    /// Sends into `rx` and writes `event`; handed to the device with every
    /// request of this worker's queues.
    completer: Completer,
}

/// The frontend's memory table mirrored on the guest-memory bus.
#[derive(Default)]
struct Mirror {
    /// Keyed by (guest address, size, host address of the crate's mapping):
    /// a SET_MEM_TABLE maps everything anew, so the same layout shows up
    /// with new host addresses and its old regions are drained.
    regions: HashMap<(u64, u64, usize), RegionId>,
    /// A finished connection's regions: drained with the next table.
    retired: Vec<RegionId>,
    next_id: u64,
}

struct Shared<D: VirtioDevice> {
    device: Arc<D>,
    bus: BusHandle,
    /// The device's admission gate and lifecycle: one lane per queue, then
    /// the control lane (config space, reset). Every request popped from a
    /// ring holds a ticket of its queue's lane until its used entry is
    /// written.
    gate: Gate,
    runtime: Runtime,
    /// The current connection, shut down when the device fails so that the
    /// frontend sees the device go away (by the gate's failure hook).
    connection: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
    /// Told when the device fails (by the gate's failure hook).
    supervisor: Arc<OnceLock<Recipient<DeviceFailed>>>,
    workers: usize,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// The memory table this server accepted (see `memory.rs`), which the
    /// ring walker reads rings through: not the crate's, which holds a
    /// new table before `update_memory` has checked it. Emptied when a
    /// connection ends.
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mirror: Mutex<Mirror>,
    /// The mappings of frontend files that can shrink, entered in the
    /// SIGBUS registry; poisoning one fails the device.
    guard: memory::Guard,
    queues: usize,
    /// Requests answered (used entries written) since the server started.
    handled: AtomicU64,
    completions: Vec<Completions>,
    /// Set once recording starts; shared with the completers, which
    /// record each request where it is answered.
    record: Arc<OnceLock<RecordTo>>,
    /// The connection's in-flight file (set by the message filter on
    /// SET_INFLIGHT_FD, emptied when the connection ends).
    inflight: Arc<inflight::Slot>,
}

/// Where a server records its messages: the journal (the process's one
/// log writer) and the names its records carry.
pub(super) struct RecordTo {
    journal: Arc<dyn Journal>,
    /// How request data is captured, as the journal asks.
    mode: DataMode,
    /// Test only ([`Until::Hash`]): a request's data is hashed, and no
    /// trace or record is made of it.
    hash_only: bool,
    /// The device's actor id: the `to` of its records.
    id: Arc<str>,
    /// The sender of each queue's requests: `driver/q0`, ...
    queues: Vec<Arc<str>>,
    /// The sender of protocol messages.
    frontend: Arc<str>,
}

/// A virtio device served over vhost-user. Cheap to clone (the crate
/// clones it for every worker).
pub struct VhostUserServer<D: VirtioDevice> {
    shared: Arc<Shared<D>>,
}

impl<D: VirtioDevice> Clone for VhostUserServer<D> {
    fn clone(&self) -> Self {
        VhostUserServer {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<D: VirtioDevice> std::fmt::Debug for VhostUserServer<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserServer")
            .field("kind", &self.shared.device.kind())
            .field("workers", &self.shared.workers)
            .finish()
    }
}

impl<D: VirtioDevice> VhostUserServer<D> {
    /// A server for `device`, with guest memory mirrored on `bus` and its
    /// queues spread over `workers` threads (at least one, at most one per
    /// queue).
    pub fn new(device: Arc<D>, bus: BusHandle, workers: usize) -> Result<Self> {
        let name = device_name(&bus);
        Self::with_runtime(device, bus, workers, &Runtime::new(), name)
    }

    /// As [`VhostUserServer::new`], numbering its messages on `runtime` and
    /// naming its gate `name` (the device id). The device is `Realized`: it
    /// was opened before it got here; [`serve`] starts it.
    pub fn with_runtime(
        device: Arc<D>,
        bus: BusHandle,
        workers: usize,
        runtime: &Runtime,
        name: String,
    ) -> Result<Self> {
        let queues = device.num_queues().max(1);
        let workers = workers.clamp(1, queues);
        let record: Arc<OnceLock<RecordTo>> = Arc::default();
        let completions = (0..workers)
            .map(|_| {
                let record = Arc::clone(&record);
                let (tx, rx) = crossbeam_channel::unbounded();
                let event = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::CreateEventFd)?);
                let armed = Arc::new(AtomicBool::new(false));
                let (wake, wake_armed) = (Arc::clone(&event), Arc::clone(&armed));
                let completer = Completer::new(move |mut request: Request, len| {
                    // Recorded here, on the thread that answers (a blk I/O
                    // thread), not on the queue worker, which every request
                    // of the queue goes through. A request dropped by a
                    // panic is left to `finish`, which may leave it in
                    // flight instead of answering it.
                    if !request.dropped_in_panic() {
                        if let Some(r) = record.get() {
                            walk::record_request(r, &mut request, len);
                        }
                    }
                    // The worker owns the receiver for the server's whole life.
                    let _ = tx.send((request, len));
                    // One eventfd write per wake-up, not per completion: if
                    // the flag was already set, the worker has not yet
                    // cleared it, so its drain (after the clear) sees this
                    // request, which was sent before the swap.
                    if !wake_armed.swap(true, Ordering::AcqRel) {
                        if let Err(e) = wake.write(1) {
                            tracing::error!(error = %e, "wake the queue worker");
                        }
                    }
                });
                Ok(Completions {
                    rx,
                    event,
                    armed,
                    completer,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let slots = usize::from(device.queue_size()).max(64);
        let gate = Gate::new(&name, queues + 1, slots);
        gate.transition(State::Realized)
            .expect("a new gate can be realized");
        sigbus::install().map_err(Error::InstallSigbus)?;
        let guard = {
            let gate = gate.clone();
            // Runs on the SIGBUS watcher's thread.
            memory::Guard::new(move |p| {
                gate.fail(format!(
                    "guest memory region at {:#x} ({:#x} bytes) lost pages its file had when \
                     mapped (the frontend shrank the file); the mapping reads zeros now",
                    p.gpa, p.len
                ));
            })
        };
        let connection: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>> = Arc::default();
        let supervisor: Arc<OnceLock<Recipient<DeviceFailed>>> = Arc::default();
        {
            let (connection, supervisor, id) = (
                Arc::clone(&connection),
                Arc::clone(&supervisor),
                name.clone(),
            );
            // Whichever thread caught the panic (a queue worker, an I/O
            // thread, the vhost-user thread) runs this once.
            gate.on_fail(move |reason| {
                tracing::error!(device = %id, %reason, "device failed; stopping it and disconnecting its frontend");
                if let Some(s) = supervisor.get() {
                    s.do_send(DeviceFailed {
                        id: DeviceId::new(&id),
                        reason: reason.to_string(),
                    });
                }
                if let Some(h) = connection.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    h.shutdown();
                }
            });
        }
        Ok(VhostUserServer {
            shared: Arc::new(Shared {
                queues,
                gate,
                runtime: runtime.clone(),
                connection,
                supervisor,
                device,
                bus,
                workers,
                event_idx: AtomicBool::new(false),
                acked_features: AtomicU64::new(0),
                mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
                mirror: Mutex::new(Mirror::default()),
                guard,
                handled: AtomicU64::new(0),
                completions,
                record,
                inflight: Arc::default(),
            }),
        })
    }

    /// Records every request and protocol message from now on through
    /// `journal` (its [`Journal::record`] hook), as actor `id`, starting with
    /// an `added` record that says how to rebuild the device for replay (or
    /// why it cannot be). Returns false if it already records, or if the
    /// journal takes no records.
    pub fn record_to(&self, journal: Arc<dyn Journal>, id: &str) -> bool {
        if self.shared.record.get().is_some() {
            return false;
        }
        let Some(mode) = journal.data_mode() else {
            return false;
        };
        let info = actor_info(&*self.shared.device, id);
        let added = Entry::json(
            journal.now(),
            0,
            Arc::from("switchboard"),
            Arc::from(id),
            RecordKind::Added,
            serde_json::to_value(&info).unwrap_or_default(),
            serde_json::Value::Null,
        );
        let to = RecordTo {
            hash_only: journal.record_until() == Until::Hash,
            journal,
            mode,
            id: Arc::from(id),
            queues: (0..self.shared.queues)
                .map(|q| Arc::from(format!("driver/q{q}")))
                .collect(),
            frontend: Arc::from("frontend"),
        };
        // The `added` record goes first: nothing of the device's can be
        // recorded before it.
        to.journal.record(added);
        // Its failure (a contained panic, a shrunk memfd) is a `failed`
        // record with the reason, written where the failure is caught: a
        // restart shows as `failed` then the fresh instance's `added`.
        let (journal, actor) = (Arc::clone(&to.journal), Arc::clone(&to.id));
        self.gate().on_fail(move |reason| {
            journal.record(Entry::json(
                journal.now(),
                0,
                Arc::from("switchboard"),
                Arc::clone(&actor),
                RecordKind::Failed,
                serde_json::json!({ "reason": reason }),
                serde_json::Value::Null,
            ));
        });
        self.shared.record.set(to).is_ok()
    }

    /// Records a protocol message (or a connection event) with its reply.
    fn note(&self, kind: RecordKind, payload: serde_json::Value, reply: serde_json::Value) {
        if let Some(r) = self.shared.record.get() {
            r.journal.record(Entry::json(
                r.journal.now(),
                0,
                Arc::clone(&r.frontend),
                Arc::clone(&r.id),
                kind,
                payload,
                reply,
            ));
        }
    }

    /// Records a connection starting or ending (called by the serve loop).
    pub fn note_connection(&self, kind: RecordKind) {
        self.note(kind, serde_json::Value::Null, serde_json::Value::Null);
    }

    /// The device.
    pub fn device(&self) -> &Arc<D> {
        &self.shared.device
    }

    /// Requests in flight on all queues.
    pub fn in_flight(&self) -> u64 {
        self.shared.gate.in_flight()
    }

    /// The device's gate: its lifecycle state, in-flight counts and drain.
    pub fn gate(&self) -> &Gate {
        &self.shared.gate
    }

    /// Tells `supervisor` when the device fails. Only the first call counts.
    pub fn supervise(&self, supervisor: Recipient<DeviceFailed>) {
        let _ = self.shared.supervisor.set(supervisor);
    }

    /// `Realized -> Running`, if not running yet.
    pub fn start(&self) {
        if self.shared.gate.state() == State::Realized {
            let _ = self.shared.gate.transition(State::Running);
        }
    }

    /// Fails the device for `reason`, from whichever thread caught the
    /// panic: it is stopped (its gate refuses everything from now on), the
    /// supervisor is told, and the frontend is disconnected. Requests in
    /// flight answer themselves with the failure status through their drop
    /// guards, so every queue's count still reaches zero.
    pub fn fail(&self, reason: String) {
        self.shared.gate.fail(reason);
    }

    /// Runs `f` on the device, containing a panic: a panic fails the device
    /// (see [`VhostUserServer::fail`]) and gives `None`.
    /// `what` names the call in the failure reason; it is only formatted
    /// if the call panicked (this is on the per-request path).
    fn contain<T>(&self, what: impl FnOnce() -> String, f: impl FnOnce(&D) -> T) -> Option<T> {
        match catch_unwind(AssertUnwindSafe(|| f(&self.shared.device))) {
            Ok(v) => Some(v),
            Err(payload) => {
                self.fail(format!("{}: {}", what(), panic_message(payload.as_ref())));
                None
            }
        }
    }

    /// Admits a control-lane message, or says why not.
    fn admit_control(&self, kind: MessageKind) -> std::result::Result<Ticket, Refused> {
        let seq = self.shared.runtime.next_seq();
        self.shared.gate.admit(self.shared.queues, seq, kind)
    }

    /// Requests answered since the server started (malformed ones included).
    pub fn handled(&self) -> u64 {
        self.shared.handled.load(Ordering::Relaxed)
    }

    fn worker_of(&self, queue: usize) -> usize {
        queue % self.shared.workers
    }

    /// Index of `queue` among the vrings of its worker.
    fn local_index(&self, queue: usize) -> usize {
        queue / self.shared.workers
    }

    fn completer(&self, queue: usize) -> &Completer {
        &self.shared.completions[self.worker_of(queue)].completer
    }

    /// Waits until nothing is in flight on `lanes`, without stopping the
    /// device. While the device runs, it waits as long as it takes (replying
    /// to the frontend before the drain is done would be a lie), logging
    /// what is pending every 5 s; once the device is stopping or failed, it
    /// gives up after [`STOP_DEADLINE`] and returns the report.
    pub fn quiesce(&self, lanes: Lanes, why: &str) -> std::result::Result<(), GateDrainError> {
        let gate = &self.shared.gate;
        let start = std::time::Instant::now();
        let mut next_log = Duration::from_secs(5);
        loop {
            match gate.wait_idle(lanes, Some(Duration::from_millis(200))) {
                Ok(()) => return Ok(()),
                Err(report) => {
                    let waited = start.elapsed();
                    if gate.state() != State::Running && waited >= STOP_DEADLINE {
                        tracing::error!(%why, error = %report, pending = ?pending_of(&report), "giving up the drain: the device is stopping");
                        return Err(report);
                    }
                    if waited >= next_log {
                        next_log += Duration::from_secs(5);
                        tracing::warn!(%why, error = %report, pending = ?pending_of(&report), "still waiting for requests in flight");
                    }
                }
            }
        }
    }

    /// Drains every queue (waits for every request in flight).
    pub fn drain_all(&self, why: &str) {
        let _ = self.quiesce(Lanes::All, why);
    }

    fn signal(&self, vring: &VringRwLock) {
        let needed = if self.shared.event_idx.load(Ordering::Acquire) {
            let mem = self.shared.mem.memory();
            vring
                .get_mut()
                .get_queue_mut()
                .needs_notification(&*mem)
                .unwrap_or(true)
        } else {
            true
        };
        if needed {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!(error = %e, "signal the guest");
            }
        }
    }

    /// Checks the table the crate mapped (`memory::check_table`), guards
    /// the mappings of files that can shrink, makes it the memory the ring
    /// walker reads, and mirrors it on the guest-memory bus.
    fn accept_memory(&self, table: &GuestMemoryMmap, accepted: &GuestMemoryMmap) -> io::Result<()> {
        let unsealed = memory::check_table(table, accepted).map_err(io::Error::other)?;
        for index in unsealed {
            self.shared
                .guard
                .ring(table, index)
                .map_err(io::Error::other)?;
        }
        self.shared
            .mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(table.clone());
        self.mirror_memory(table)
    }

    /// Forgets the memory of a connection that is over (called once its
    /// workers have exited and the crate's handler is gone): the ring
    /// walker's memory is emptied and the guarded mappings nobody holds any
    /// more are unmapped.
    ///
    /// Its bus regions are retired: a reused mapping address would make
    /// one pass for the next frontend's (whose requests then used the old
    /// file); drained with the next table, not here, where a request never
    /// answered would hold the drain for ever.
    pub(crate) fn forget_memory(&self) {
        self.shared
            .mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(GuestMemoryMmap::new());
        let mut mirror = self.shared.mirror.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<RegionId> = mirror.regions.drain().map(|(_, id)| id).collect();
        mirror.retired.extend(ids);
        drop(mirror);
        self.shared.guard.sweep();
    }

    /// Mirrors the crate's memory onto the guest-memory bus; removed regions
    /// are drained before this returns.
    fn mirror_memory(&self, mem: &GuestMemoryMmap) -> io::Result<()> {
        let mut mirror = self.shared.mirror.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = HashMap::new();
        for (index, region) in mem.iter().enumerate() {
            let key = (
                region.start_addr().0,
                region.len(),
                region.as_ptr() as usize,
            );
            if let Some(id) = mirror.regions.get(&key) {
                seen.insert(key, *id);
                continue;
            }
            let fo = region.file_offset().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "memory region without a file")
            })?;
            let file: File = fo.file().try_clone()?;
            let ram = RamRegion::from_file(format!("guest@{:#x}", key.0), file, fo.start(), key.1)
                .map_err(io::Error::other)?;
            if !memory::sealed(fo.file()) {
                self.shared
                    .guard
                    .bus(index, key.0, Arc::clone(&ram))
                    .map_err(io::Error::other)?;
            }
            let id = RegionId(mirror.next_id);
            mirror.next_id += 1;
            // Added before the regions it replaces are removed: at equal
            // priority the later region wins, so a replaced range never
            // reads as a hole while the old one drains.
            let spec = RegionSpec {
                size: key.1,
                kind: RegionKind::Leaf(Target::Ram(ram)),
            };
            futures::executor::block_on(self.shared.bus.add_region(
                id,
                spec,
                Placement::root(key.0, 0),
            ))
            .map_err(io::Error::other)?;
            seen.insert(key, id);
        }
        let gone: Vec<((u64, u64, usize), RegionId)> = mirror
            .regions
            .iter()
            .filter(|(k, _)| !seen.contains_key(*k))
            .map(|(k, v)| (*k, *v))
            .collect();
        for (key, id) in gone {
            tracing::debug!(
                gpa = key.0,
                size = key.1,
                "draining removed guest memory region"
            );
            futures::executor::block_on(self.shared.bus.remove_region(id))
                .map_err(io::Error::other)?;
        }
        for id in std::mem::take(&mut mirror.retired) {
            futures::executor::block_on(self.shared.bus.remove_region(id))
                .map_err(io::Error::other)?;
        }
        mirror.regions = seen;
        Ok(())
    }
}

impl<D: VirtioDevice> VhostUserBackend for VhostUserServer<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.shared.queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.device.queue_size())
    }

    fn features(&self) -> u64 {
        self.shared.device.device_features()
            | VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn acked_features(&self, features: u64) {
        self.shared
            .acked_features
            .store(features, Ordering::Release);
        self.note(
            RecordKind::SetFeatures,
            serde_json::json!({ "features": features }),
            serde_json::Value::Null,
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let features = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE;
        // Test only: the control run of `integration/qemu/kill-restart.sh`,
        // which shows what a restart does without in-flight tracking.
        if std::env::var_os(NO_INFLIGHT_ENV).is_some() {
            return features;
        }
        features | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn reset_device(&self) {
        // Counted on the control lane while it runs; the queues' lanes are
        // the ones to quiesce (the control lane holds this very message).
        let _ticket = self.admit_control(MessageKind::Control);
        for q in 0..self.shared.queues {
            let _ = self.quiesce(Lanes::One(q), "RESET_DEVICE");
        }
        self.contain(|| "reset".into(), |d| d.reset());
        self.note(
            RecordKind::ResetDevice,
            serde_json::Value::Null,
            serde_json::Value::Null,
        );
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let out = match self.admit_control(MessageKind::GetConfig) {
            Ok(_ticket) => self
                .contain(|| "read the config space".into(), |d| d.config())
                .map(|c| config_window(&c, offset, size))
                .unwrap_or_default(),
            Err(refused) => {
                tracing::warn!(%refused, "GET_CONFIG refused");
                Vec::new()
            }
        };
        self.note(
            RecordKind::GetConfig,
            serde_json::json!({ "offset": offset, "size": size }),
            serde_json::json!({ "data": switchboard_runtime::recording::Data::Bytes(out.clone()) }),
        );
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let snapshot = mem.memory();
        let accepted = self.shared.mem.memory();
        let result = self.accept_memory(&snapshot, &accepted);
        if let Err(e) = &result {
            tracing::error!(
                device = %self.shared.gate.name(),
                error = %e,
                "memory table refused; the frontend is sent an error and disconnected"
            );
            // The crate's memory, and the ring walker's, as they were
            // before this message: the refused mappings go (once the crate
            // returns), and nothing reads them meanwhile.
            mem.lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace((*accepted).clone());
            self.shared
                .mem
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace((*accepted).clone());
        }
        if self.shared.record.get().is_some() {
            let regions: Vec<serde_json::Value> = snapshot
                .iter()
                .map(|r| serde_json::json!({ "gpa": r.start_addr().0, "size": r.len() }))
                .collect();
            let reply = match &result {
                Ok(()) => serde_json::json!("ok"),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            };
            self.note(
                RecordKind::SetMemTable,
                serde_json::json!({ "regions": regions }),
                reply,
            );
        }
        drop((snapshot, accepted));
        self.shared.guard.sweep();
        result
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let queues = self.num_queues();
        (0..self.shared.workers)
            .map(|w| {
                (0..queues)
                    .filter(|q| q % self.shared.workers == w)
                    .fold(0u64, |m, q| m | (1 << q))
            })
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // None: the crate registers the consumer with `into_raw_fd` and never
        // closes it, which leaked an eventfd per worker per connection. The
        // workers of a finished connection are ended by `serve_connection`'s
        // own exit event instead (see `handle_event`).
        None
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let result = match self.admit_control(MessageKind::SetConfig) {
            Ok(_ticket) => self
                .contain(
                    || "write the config space".into(),
                    |d| d.set_config(offset, buf),
                )
                .unwrap_or_else(|| Err(io::Error::other("the device failed"))),
            Err(refused) => Err(io::Error::other(refused)),
        };
        self.note(
            RecordKind::SetConfig,
            serde_json::json!({ "offset": offset, "data": switchboard_runtime::recording::Data::Bytes(buf.to_vec()) }),
            match &result {
                Ok(()) => serde_json::json!("ok"),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            },
        );
        result
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let queue = queue_index as usize;
        if queue < self.shared.queues {
            self.quiesce(Lanes::One(queue), "GET_VRING_BASE")
                .map_err(io::Error::other)?;
        }
        self.note(
            RecordKind::GetVringBase,
            serde_json::json!({ "queue": queue_index }),
            serde_json::json!({ "in_flight": 0 }),
        );
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let queues = self.num_queues();
        let event = usize::from(device_event);
        if event < vrings.len() {
            let queue = event * self.shared.workers + thread_id;
            if queue < queues {
                // The device's own methods are contained one by one inside;
                // this catches a panic in the walk itself.
                match catch_unwind(AssertUnwindSafe(|| {
                    self.process_queue(queue, &vrings[event])
                })) {
                    Ok(r) => r?,
                    Err(p) => self.fail(format!(
                        "queue {queue} worker: {}",
                        panic_message(p.as_ref())
                    )),
                }
            }
        } else if event == queues + 1 {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| {
                self.process_completions(thread_id, vrings)
            })) {
                self.fail(format!(
                    "worker {thread_id} completions: {}",
                    panic_message(p.as_ref())
                ));
            }
        } else if event == serve::exit_token(queues) {
            // The connection is over: an error is what ends the crate's
            // epoll loop when there is no crate exit event.
            return Err(io::Error::other("connection over: worker exits"));
        }
        Ok(())
    }
}

/// The pending list of a drain report, oldest first.
fn pending_of(report: &GateDrainError) -> &[Pending] {
    match report {
        GateDrainError::Timeout { pending, .. } => pending,
        GateDrainError::Failed { .. } => &[],
    }
}

/// A name for a device served without one: its guest-memory bus's, less
/// the suffix.
fn device_name(bus: &BusHandle) -> String {
    let id = bus.id().to_string();
    id.strip_suffix("-guest-memory").unwrap_or(&id).to_string()
}
