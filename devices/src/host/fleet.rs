// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Many devices in one process: what `switchboard run` starts and the
//! control socket drives.
//!
//! # Isolation
//!
//! One device's panic or slow handler never stalls another:
//! - a vhost-user device (virtio-blk, virtio-rng, virtio-fault) runs on
//!   threads of its own: the thread serving its socket, the vhost-user
//!   protocol thread, its queue workers and (blk, and virtio-fault with
//!   `io-thread`) its I/O threads. Its guest-memory bus is an
//!   actor on a small shared pool of arbiters; those actors never run device
//!   code and never block.
//! - an MMIO/PIO device is an actor on an arbiter of its own, and each bus
//!   is an actor on an arbiter of its own; a panic in device code is
//!   contained by its device actor (the runtime core's guarantee).
//!
//! # Removal
//!
//! [`Fleet::remove`] returns only once the device is drained and stopped:
//! for a vhost-user device, the frontend is disconnected, every request in
//! flight is completed and its used entry written, and the socket file is
//! removed; for an MMIO/PIO device, its region leaves the bus and the device
//! actor drains. A second removal of the same device while it drains waits
//! for the same drain and gets the same answer.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use actix::{Arbiter, ArbiterHandle, System};
use serde::Serialize;
use switchboard_bus::{BusHandle, RegionId};
use switchboard_runtime::journal::Journal;
use switchboard_runtime::recording::{ActorInfo, Entry as LogEntry, RecordKind, Recorder};
use switchboard_runtime::{
    BusAddr, DeviceFailed, DeviceRef, Gate, GateDrainError, IrqLine, IrqNumber, QueryFailures,
    Runtime, State, Supervisor,
};

use crate::error_chain;
use crate::host::restart::{serve_supervised, InstanceBuilder, Make, Supervised};
use crate::host::topology::{BlkSpec, DeviceSpec, KindSpec, VhostUserSpec};
use crate::models::blk::{Blk, BlkOptions};
use crate::models::fault::FaultDevice;
use crate::models::rng::Rng;
use crate::models::serial::{spawn_serial, SerialRebuild};
use crate::models::slow::{SlowDevice, SlowDeviceRebuild};
use crate::models::uart_sink::Sink;
use crate::models::virtio::VirtioDevice;
use crate::vhost_user::{
    bind, default_workers, BoundSocket, StopHandle, DRAIN_DEADLINE_PASSED, STOP_DEADLINE,
};

/// Guest-memory bus arbiters shared by vhost-user devices.
const MEMORY_ARBITERS: usize = 2;

/// How long a status query waits for a device actor before reporting it
/// unresponsive.
const STATUS_TIMEOUT: Duration = Duration::from_millis(200);

/// How a vhost-user device is served beyond what its [`DeviceSpec`] says:
/// what `switchboard serve` takes on its command line that a topology file
/// does not. The default is what a topology's devices get.
#[derive(Debug, Default)]
pub struct Serving {
    /// A socket already listening (`--socket-fd`), served instead of
    /// binding the spec's socket path. Its file is not removed at the end.
    pub socket: Option<BoundSocket>,
    /// Threads walking the virtqueues (default: for virtio-blk one per
    /// queue, at most one per CPU; otherwise one).
    pub workers: Option<usize>,
}

/// Errors of the fleet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device with this id exists.
    #[error("Device '{0}' already exists")]
    Duplicate(String),
    /// No such device.
    #[error("Device '{0}' not found")]
    NotFound(String),
    /// No such bus.
    #[error("Device '{device}': bus '{bus}' not found")]
    NoBus {
        /// The device.
        device: String,
        /// The bus.
        bus: String,
    },
    /// Starting a device failed.
    #[error("Device '{id}' ({kind}) did not start: {reason}")]
    Start {
        /// The device.
        id: String,
        /// Its kind.
        kind: &'static str,
        /// Why.
        reason: String,
    },
    /// Stopping a device failed.
    #[error("Device '{id}' did not stop cleanly: {reason}")]
    Stop {
        /// The device.
        id: String,
        /// Why.
        reason: String,
    },
}

/// What `query-devices` reports for a device.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id.
    pub id: String,
    /// Kind.
    pub kind: &'static str,
    /// The lifecycle state (`created`, `realized`, `running`, `draining`,
    /// `stopped`), as the device's gate holds it, `restarting` for a
    /// vhost-user device that failed and will be restarted, or
    /// `unresponsive` for a device actor that does not answer a status
    /// query.
    pub state: String,
    /// Why the device failed (a contained panic), if it did: for a
    /// vhost-user device, its instance's failure, with `; restart limit N
    /// reached` once no restart is left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// How many times it was restarted after a failure (vhost-user
    /// devices with a restart policy; 0 otherwise).
    pub restarts: u64,
    /// Requests or accesses accepted and not yet answered.
    pub in_flight: u64,
    /// Requests or accesses answered since it started.
    pub handled: u64,
    /// Where it is: `socket PATH` or `bus ID @ ADDR`.
    pub at: String,
}

/// An actix system on a thread of its own; stops when dropped.
struct OwnArbiter {
    handle: ArbiterHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl OwnArbiter {
    fn start(name: &str) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                System::new().block_on(async move {
                    let _ = tx.send(Arbiter::current());
                    // Runs until the sender is used or dropped.
                    let _ = stop_rx.await;
                });
            })?;
        let handle = rx
            .recv()
            .map_err(|_| std::io::Error::other("the arbiter thread died at start"))?;
        Ok(OwnArbiter {
            handle,
            stop: Some(stop_tx),
        })
    }
}

impl Drop for OwnArbiter {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Polls `fut` on this thread until it is ready or `timeout` passes. The
/// futures of bus and device handles are answered by actors on other
/// threads, so polling here never runs device code.
fn wait_for<F: Future>(fut: F, timeout: Duration) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let start = Instant::now();
    let mut nap = Duration::from_micros(50);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(5));
    }
}

/// A bus of the topology.
struct Bus {
    handle: BusHandle,
    _arbiter: OwnArbiter,
}

enum Body {
    VhostUser {
        /// Its instance now, its restart policy and count.
        supervised: Arc<Supervised>,
        stop: StopHandle,
        thread: Mutex<Option<thread::JoinHandle<crate::vhost_user::Result<()>>>>,
        socket: PathBuf,
    },
    OnBus {
        bus: String,
        addr: u64,
        device: DeviceRef,
        region: RegionId,
        arbiter: Mutex<Option<OwnArbiter>>,
    },
}

struct Entry {
    id: String,
    kind: &'static str,
    body: Body,
}

/// A device, running or being removed (a later removal waits on the
/// device's gate for the same drain).
enum Slot {
    Running(Arc<Entry>),
    Removing(Arc<Entry>),
}

impl Entry {
    /// The device's gate: its state, and the one drain every removal waits
    /// for.
    fn gate(&self) -> Gate {
        match &self.body {
            Body::VhostUser { supervised, .. } => supervised.current().gate().clone(),
            Body::OnBus { device, .. } => device.gate().clone(),
        }
    }
}

/// The interrupt line of every UART the fleet starts (COM1's ISA IRQ).
pub const UART_IRQ: IrqNumber = IrqNumber(4);

/// What replay needs to rebuild an MMIO/PIO device, from its spec alone
/// (its `added` record and the log header hold it); `None` for a
/// vhost-user device, whose rebuild data comes from the opened device.
pub fn mmio_rebuild_info(spec: &DeviceSpec) -> Option<serde_json::Value> {
    let info = match spec {
        DeviceSpec::Uart16550(_) => serde_json::to_value(SerialRebuild { irq: UART_IRQ }),
        DeviceSpec::TestDevice(t) => {
            serde_json::to_value(SlowDeviceRebuild::new(t.config().read_delay))
        }
        DeviceSpec::VirtioBlk(_) | DeviceSpec::VirtioRng(_) | DeviceSpec::VirtioFault(_) => {
            return None
        }
    };
    // Two structs of integers always serialize.
    info.ok()
}

/// The prefix of the failure reason of a device whose stop itself failed.
const STOP_FAILED: &str = "stop failed: ";

/// The result of a removal, from the device's gate: the drain time it
/// reports (the same for every removal of the device); zero for a device
/// that had failed (a contained panic: it is stopped and removed, its
/// failure listed); or why it did not stop cleanly (its stop failed, or
/// its drain deadline passed and it was stopped anyway).
fn drained(gate: &Gate, stopped: Result<(), String>) -> Result<Duration, String> {
    stopped?;
    match gate.drain(None) {
        Ok(report) => Ok(report.waited),
        Err(GateDrainError::Failed { reason, .. })
            if reason.starts_with(STOP_FAILED) || reason.starts_with(DRAIN_DEADLINE_PASSED) =>
        {
            Err(reason)
        }
        Err(GateDrainError::Failed { .. }) => Ok(Duration::ZERO),
        Err(e) => Err(e.to_string()),
    }
}

/// The devices of one process.
pub struct Fleet {
    runtime: Runtime,
    memory_arbiters: Vec<OwnArbiter>,
    next_memory_arbiter: AtomicUsize,
    buses: Mutex<HashMap<String, Bus>>,
    devices: Mutex<BTreeMap<String, Slot>>,
    next_region: AtomicU64,
    /// Whether a removal is recorded (a `removed` record); see
    /// [`Fleet::record_removals`].
    record_removals: AtomicBool,
    /// Told of every device failure (a contained panic), vhost-user and
    /// MMIO/PIO devices alike.
    supervisor: Addr<Supervisor>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("devices", &self.lock_devices().len())
            .finish()
    }
}

impl Fleet {
    /// An empty fleet with its guest-memory arbiters started.
    pub fn new() -> std::io::Result<Self> {
        Self::new_recording(None)
    }

    /// As [`Fleet::new`], recording to `recorder` (if any) every device
    /// added (with how to rebuild it for replay), every message each
    /// device and bus receives, and every removal.
    pub fn new_recording(recorder: Option<Recorder>) -> std::io::Result<Self> {
        let memory_arbiters = (0..MEMORY_ARBITERS)
            .map(|i| OwnArbiter::start(&format!("guest-mem{i}")))
            .collect::<std::io::Result<Vec<_>>>()?;
        let runtime = match &recorder {
            Some(r) => Runtime::with_journal(Arc::new(
                switchboard_runtime::journal::RecordJournal::new(r.clone()),
            )),
            None => Runtime::new(),
        };
        let supervisor =
            Supervisor::start_in_arbiter(&memory_arbiters[0].handle, |_| Supervisor::default());
        Ok(Fleet {
            runtime,
            memory_arbiters,
            next_memory_arbiter: AtomicUsize::new(0),
            buses: Mutex::default(),
            devices: Mutex::default(),
            next_region: AtomicU64::new(1),
            record_removals: AtomicBool::new(true),
            supervisor,
        })
    }

    fn note(
        &self,
        id: &str,
        kind: RecordKind,
        payload: serde_json::Value,
        reply: serde_json::Value,
    ) {
        if let Some(j) = self.journal() {
            j.record(LogEntry::json(
                j.now(),
                0,
                Arc::from("switchboard"),
                Arc::from(id),
                kind,
                payload,
                reply,
            ));
        }
    }

    /// The runtime's journal, if it records to a log: every record of the
    /// fleet and its devices goes through it.
    fn journal(&self) -> Option<&Arc<dyn Journal>> {
        self.runtime.journal().filter(|j| j.data_mode().is_some())
    }

    fn lock_devices(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Slot>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an MMIO/PIO bus (an address space actor on its own arbiter).
    pub fn add_bus(&self, id: &str) -> std::io::Result<()> {
        let arbiter = OwnArbiter::start(&format!("bus-{id}"))?;
        let handle = BusHandle::start(&self.runtime, id, &arbiter.handle);
        self.buses.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id.to_string(),
            Bus {
                handle,
                _arbiter: arbiter,
            },
        );
        Ok(())
    }

    /// A bus's handle (to drive accesses in tests and examples).
    pub fn bus(&self, id: &str) -> Option<BusHandle> {
        self.buses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|b| b.handle.clone())
    }

    /// Starts a device, checked (see [`crate::host::topology`]). Its id
    /// must be new. A failure leaves nothing behind.
    pub fn add(&self, spec: &DeviceSpec) -> Result<(), Error> {
        self.add_serving(spec, Serving::default())
    }

    /// As [`Fleet::add`], serving a vhost-user device as `serving` says
    /// (ignored for a device on a bus).
    pub fn add_serving(&self, spec: &DeviceSpec, serving: Serving) -> Result<(), Error> {
        self.add_entry(spec.id().as_str(), || self.start(spec, serving))
    }

    /// Whether removals are recorded from now on, each as a `removed`
    /// record with its drain time (the default). `switchboard serve` turns
    /// it off: its log holds its devices' own records, and ends where the
    /// process does.
    pub fn record_removals(&self, record: bool) {
        self.record_removals.store(record, Ordering::Relaxed);
    }

    /// As [`Fleet::add`] for a disk, opened with `options` in place of the
    /// spec's ([`BlkSpec::blk_options`]): for tests and benchmarks that need
    /// what a topology does not offer (added latency, I/O threads).
    pub fn add_blk(&self, spec: &BlkSpec, options: &BlkOptions) -> Result<(), Error> {
        self.add_blk_serving(spec, options, Serving::default())
    }

    /// As [`Fleet::add_blk`], served as `serving` says.
    pub fn add_blk_serving(
        &self,
        spec: &BlkSpec,
        options: &BlkOptions,
        serving: Serving,
    ) -> Result<(), Error> {
        self.add_entry(spec.id().as_str(), || {
            self.start_blk(spec, options, serving)
        })
    }

    fn add_entry(
        &self,
        id: &str,
        start: impl FnOnce() -> Result<Entry, Error>,
    ) -> Result<(), Error> {
        let id = id.to_string();
        // Reserve the id first: two concurrent adds of one id cannot both
        // start.
        if self.lock_devices().contains_key(&id) {
            return Err(Error::Duplicate(id));
        }
        let entry = start()?;
        let mut devices = self.lock_devices();
        if devices.contains_key(&id) {
            drop(devices);
            let _ = Self::stop_entry(&entry);
            return Err(Error::Duplicate(id));
        }
        devices.insert(id, Slot::Running(Arc::new(entry)));
        Ok(())
    }

    /// The resolver: a checked spec to a running device.
    fn start(&self, spec: &DeviceSpec, serving: Serving) -> Result<Entry, Error> {
        let (id, kind) = (spec.id().as_str(), spec.kind_name());
        let fail = |reason: String| Error::Start {
            id: id.to_string(),
            kind,
            reason,
        };
        match spec {
            DeviceSpec::VirtioBlk(b) => self.start_blk(b, &b.blk_options(), serving),
            DeviceSpec::VirtioRng(r) => {
                let rate_limit = r.rate_limit;
                let workers = serving.workers.unwrap_or(1);
                self.start_vhost_user(
                    id,
                    kind,
                    move || Rng::new(rate_limit).map_err(|e| e.to_string()),
                    workers,
                    &r.vhost_user,
                    serving.socket,
                )
            }
            DeviceSpec::VirtioFault(f) => {
                let config = f.config();
                let workers = serving.workers.unwrap_or(1);
                self.start_vhost_user(
                    id,
                    kind,
                    move || FaultDevice::new(config).map_err(|e| e.to_string()),
                    workers,
                    &f.vhost_user,
                    serving.socket,
                )
            }
            DeviceSpec::Uart16550(u) => {
                let arbiter =
                    OwnArbiter::start(&format!("dev-{id}")).map_err(|e| fail(e.to_string()))?;
                let device = spawn_serial(
                    &self.runtime,
                    u.id.clone(),
                    &Sink::from(&u.output),
                    IrqLine::disconnected(UART_IRQ),
                    &arbiter.handle,
                    Some(self.supervisor.clone().recipient()),
                )
                .map_err(|e| fail(error_chain(&e)))?
                .device;
                self.plug(spec, device, arbiter)
            }
            DeviceSpec::TestDevice(t) => {
                let arbiter =
                    OwnArbiter::start(&format!("dev-{id}")).map_err(|e| fail(e.to_string()))?;
                let (slow, _probe) = SlowDevice::new(t.config());
                let device = switchboard_runtime::spawn_device(
                    &self.runtime,
                    t.id.clone(),
                    slow,
                    &arbiter.handle,
                    Some(self.supervisor.clone().recipient()),
                )
                .device;
                self.plug(spec, device, arbiter)
            }
        }
    }

    fn start_blk(
        &self,
        spec: &BlkSpec,
        options: &BlkOptions,
        serving: Serving,
    ) -> Result<Entry, Error> {
        let (id, kind) = (spec.id().as_str(), BlkSpec::KIND.as_str());
        let workers = serving
            .workers
            .unwrap_or_else(|| default_workers(usize::from(options.queues)));
        let (path, options) = (spec.path.clone(), options.clone());
        self.start_vhost_user(
            id,
            kind,
            // A restart opens the image again.
            move || Blk::open(&path, &options).map_err(|e| error_chain(&e)),
            workers,
            &spec.vhost_user,
            serving.socket,
        )
    }

    /// Starts a vhost-user device made by `make_device`, on its own serving
    /// thread, which restarts it with a fresh device from `make_device` as
    /// `vhost_user.restart` says ([`crate::host::restart`]).
    fn start_vhost_user<D: VirtioDevice>(
        &self,
        id: &str,
        kind: &'static str,
        make_device: impl Fn() -> Result<D, String> + Send + 'static,
        workers: usize,
        vhost_user: &VhostUserSpec,
        inherited: Option<BoundSocket>,
    ) -> Result<Entry, Error> {
        let fail = |reason: String| Error::Start {
            id: id.to_string(),
            kind,
            reason,
        };
        let device = make_device().map_err(fail)?;
        let n = self.next_memory_arbiter.fetch_add(1, Ordering::Relaxed);
        let builder = InstanceBuilder {
            runtime: self.runtime.clone(),
            arbiter: self.memory_arbiters[n % self.memory_arbiters.len()]
                .handle
                .clone(),
            supervisor: self.supervisor.clone().recipient(),
            journal: self.journal().cloned(),
            id: id.to_string(),
            workers,
        };
        // Started once built: the device accepts frontends once bound.
        let first = builder.build(device).map_err(fail)?;
        let bound = match inherited {
            Some(bound) => bound,
            None => bind(&vhost_user.socket).map_err(|e| fail(error_chain(&e)))?,
        };
        let supervised = Arc::new(Supervised::new(vhost_user.restart, &first));
        let make: Make = Box::new(move || builder.build(make_device()?));
        let stop = StopHandle::default();
        let thread = {
            let (supervised, stop, id) = (Arc::clone(&supervised), stop.clone(), id.to_string());
            thread::Builder::new()
                .name(format!("serve-{id}").chars().take(15).collect())
                .spawn(move || serve_supervised(&supervised, &id, bound, &stop, first, make))
                .map_err(|e| fail(e.to_string()))?
        };
        Ok(Entry {
            id: id.to_string(),
            kind,
            body: Body::VhostUser {
                supervised,
                stop,
                thread: Mutex::new(Some(thread)),
                socket: vhost_user.socket.clone(),
            },
        })
    }

    fn plug(
        &self,
        spec: &DeviceSpec,
        device: DeviceRef,
        arbiter: OwnArbiter,
    ) -> Result<Entry, Error> {
        let (id, kind) = (spec.id().as_str(), spec.kind_name());
        let place = spec
            .placement()
            .expect("only a device with a register region is plugged");
        let (bus, addr, size) = (place.bus.as_str(), place.addr.0, place.size);
        let fail = |reason: String| Error::Start {
            id: id.to_string(),
            kind,
            reason,
        };
        let handle = self.bus(bus).ok_or_else(|| Error::NoBus {
            device: id.to_string(),
            bus: bus.to_string(),
        })?;
        let info = ActorInfo {
            id: id.to_string(),
            kind: kind.to_string(),
            rebuild: mmio_rebuild_info(spec),
            not_replayable: None,
        };
        self.note(
            id,
            RecordKind::Added,
            serde_json::to_value(&info).unwrap_or_default(),
            serde_json::Value::Null,
        );
        let timeout = Duration::from_secs(10);
        wait_for(device.realize_and_start(), timeout)
            .ok_or_else(|| fail("the device did not start within 10 s".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let region = RegionId(self.next_region.fetch_add(1, Ordering::Relaxed));
        wait_for(
            handle.add_device(region, &device, Default::default(), BusAddr(addr), size),
            timeout,
        )
        .ok_or_else(|| fail(format!("bus '{bus}' did not answer within 10 s")))?
        .map_err(|e| fail(e.to_string()))?;
        Ok(Entry {
            id: id.to_string(),
            kind,
            body: Body::OnBus {
                bus: bus.to_string(),
                addr,
                device,
                region,
                arbiter: Mutex::new(Some(arbiter)),
            },
        })
    }

    /// Drains and stops `entry`, within a bounded time: a device whose
    /// drain does not finish in [`STOP_DEADLINE`] is failed with the drain
    /// report, and stops anyway.
    fn stop_entry(entry: &Entry) -> Result<(), String> {
        match &entry.body {
            Body::VhostUser { stop, thread, .. } => {
                // Disconnects the frontend; the serving thread drains every
                // queue before it returns, and removes the socket file.
                stop.stop();
                let t = thread.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(t) = t {
                    match t.join() {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(error_chain(&e)),
                        Err(_) => return Err("its serving thread panicked".into()),
                    }
                }
            }
            Body::OnBus {
                device, arbiter, ..
            } => {
                // Unplugged from its bus by the caller; drain the actor.
                let drained = futures::executor::block_on(device.drain(Some(STOP_DEADLINE)));
                if let Err(e @ switchboard_runtime::DrainError::Timeout { .. }) = &drained {
                    tracing::error!(device = %device.id(), error = %e, "stopping it anyway");
                    device.gate().fail(format!("{DRAIN_DEADLINE_PASSED}{e}"));
                }
                // Stops the actor, whatever it was doing.
                arbiter.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
        }
        Ok(())
    }

    /// Drains and stops device `id`; returns how long the drain took (from
    /// the device's gate: every removal of one device gets the same). A
    /// removal of a device already being removed waits for that drain. A
    /// device that had failed is removed as well; its failure stays listed
    /// in [`Fleet::failures`].
    pub fn remove(&self, id: &str) -> Result<Duration, Error> {
        let (entry, first) = {
            let mut devices = self.lock_devices();
            match devices.get(id) {
                None => return Err(Error::NotFound(id.to_string())),
                Some(Slot::Removing(e)) => (Arc::clone(e), false),
                Some(Slot::Running(e)) => {
                    let e = Arc::clone(e);
                    devices.insert(id.to_string(), Slot::Removing(Arc::clone(&e)));
                    (e, true)
                }
            }
        };
        let stopped = if first {
            let start = self
                .journal()
                .filter(|_| self.record_removals.load(Ordering::Relaxed))
                .map(|j| j.now());
            let stopped = self.unplug_and_stop(&entry);
            if let Err(reason) = &stopped {
                // Whatever failed, later removals must not wait for ever.
                entry.gate().fail(format!("{STOP_FAILED}{reason}"));
            }
            let result = drained(&entry.gate(), stopped);
            if let (Some(start), Some(j)) = (start, self.journal()) {
                let reply = match &result {
                    Ok(d) => serde_json::json!({ "drain_ms": d.as_secs_f64() * 1000.0 }),
                    Err(e) => serde_json::json!({ "error": e }),
                };
                j.record(LogEntry::json(
                    start,
                    j.now().saturating_sub(start),
                    Arc::from("switchboard"),
                    Arc::from(id),
                    RecordKind::Removed,
                    serde_json::Value::Null,
                    reply,
                ));
            }
            self.lock_devices().remove(id);
            result
        } else {
            drained(&entry.gate(), Ok(()))
        };
        stopped.map_err(|reason| Error::Stop {
            id: id.to_string(),
            reason,
        })
    }

    fn unplug_and_stop(&self, entry: &Entry) -> Result<(), String> {
        if let Body::OnBus { bus, region, .. } = &entry.body {
            // Off the bus first: no access reaches the device afterwards.
            if let Some(handle) = self.bus(bus) {
                futures::executor::block_on(handle.remove_region(*region))
                    .map_err(|e| e.to_string())?;
            }
        }
        Self::stop_entry(entry)
    }

    /// Removes every device (each drained), in parallel.
    pub fn remove_all(&self) -> Vec<(String, Result<Duration, Error>)> {
        let ids: Vec<String> = self.lock_devices().keys().cloned().collect();
        thread::scope(|s| {
            let handles: Vec<_> = ids
                .iter()
                .map(|id| s.spawn(move || (id.clone(), self.remove(id))))
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    }

    /// Every device's state and counters, by id.
    pub fn query(&self) -> Vec<DeviceInfo> {
        let entries: Vec<(Arc<Entry>, bool)> = self
            .lock_devices()
            .values()
            .map(|s| match s {
                Slot::Running(e) => (Arc::clone(e), false),
                Slot::Removing(e) => (Arc::clone(e), true),
            })
            .collect();
        entries
            .into_iter()
            .map(|(e, removing)| Self::info(&e, removing))
            .collect()
    }

    fn info(e: &Entry, removing: bool) -> DeviceInfo {
        match &e.body {
            Body::VhostUser {
                supervised,
                socket,
                stop,
                ..
            } => {
                let server = supervised.current();
                let (state, failure) = supervised.status(removing || stop.stopped());
                DeviceInfo {
                    id: e.id.clone(),
                    kind: e.kind,
                    // A removal that has not reached the gate yet (the first
                    // step is the disconnect) already counts as draining, and
                    // so does a failed device whose requests in flight are
                    // still being answered by their drop guards: `stopped`
                    // means nothing is left in flight.
                    state: if (removing && state == State::Running.to_string())
                        || (state == State::Stopped.to_string() && server.in_flight() > 0)
                    {
                        State::Draining.to_string()
                    } else {
                        state
                    },
                    failure,
                    restarts: supervised.restarts(),
                    in_flight: server.in_flight(),
                    handled: server.handled(),
                    at: format!("socket {}", socket.display()),
                }
            }
            Body::OnBus {
                bus, addr, device, ..
            } => {
                let at = format!("bus {bus} @ {addr:#x}");
                match wait_for(device.status(), STATUS_TIMEOUT).flatten() {
                    Some(s) => DeviceInfo {
                        id: e.id.clone(),
                        kind: e.kind,
                        state: s.state.to_string(),
                        failure: device.gate().failure(),
                        restarts: 0,
                        in_flight: s.pending,
                        handled: s.handled,
                        at,
                    },
                    None => DeviceInfo {
                        id: e.id.clone(),
                        kind: e.kind,
                        state: if device.connected() {
                            "unresponsive".to_string()
                        } else {
                            device.gate().state().to_string()
                        },
                        failure: device.gate().failure(),
                        restarts: 0,
                        in_flight: 0,
                        handled: 0,
                        at,
                    },
                }
            }
        }
    }

    /// Every device failure the supervisor was told of, oldest first.
    pub fn failures(&self) -> Vec<DeviceFailed> {
        wait_for(self.supervisor.send(QueryFailures), STATUS_TIMEOUT)
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// Number of devices (including those being removed).
    pub fn len(&self) -> usize {
        self.lock_devices().len()
    }

    /// Whether there are no devices.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bus counters (unassigned accesses) by bus id.
    pub fn bus_stats(&self) -> Vec<(String, Option<switchboard_bus::BusStats>)> {
        let buses: Vec<(String, BusHandle)> = self
            .buses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, b)| (k.clone(), b.handle.clone()))
            .collect();
        buses
            .into_iter()
            .map(|(id, h)| {
                let stats = wait_for(h.stats(), STATUS_TIMEOUT).and_then(Result::ok);
                (id, stats)
            })
            .collect()
    }
}
