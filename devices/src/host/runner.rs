// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard run` and `switchboard serve`: a topology's devices in one
//! [`Fleet`], driven over the control socket ([`crate::host::control`]).
//! `serve` builds a topology of one device (or one per socket) from its
//! command line and starts it here too, with [`StartOptions`] for what a
//! topology file cannot say (an inherited socket, queue workers, queue
//! size, I/O threads).
//!
//! Control commands:
//! - `query-devices`: every device with its id, kind, state (`restarting`
//!   for a failed vhost-user device waiting for its restart), failure,
//!   restarts, requests in flight, requests handled, and where it is
//!   (socket or bus address).
//! - `device-add`: arguments are one device object, as in a topology file
//!   (relative paths are taken from the topology file's directory). It is
//!   checked like a file's devices, against the devices running now.
//! - `device-del {"id": ID}`: replies once the device is drained and
//!   stopped, with the drain time; a second `device-del` of a device being
//!   removed waits for the same drain. A device that failed (a contained
//!   panic) is removed all the same, and the reply is an error that gives
//!   the failure.
//! - `query-stats`: uptime, device count, totals, resident memory, threads
//!   and bus counters.
//! - `query-failures`: every device failure (a contained panic) the
//!   supervisor was told of: the device id and the reason.
//! - `bus-read {"bus", "addr", "size"}` and `bus-write {"bus", "addr",
//!   "size", "value"}` ([`BusAccessRequest`]): one access sent to the bus
//!   actor from [`CONTROL_ACTOR`], exactly as a guest access is, so the
//!   owning device's gate admits it (or refuses it while the device drains
//!   or after it stopped or failed: a `DeviceNotActive` error), a drain
//!   waits for it, and a recording logs it. `bus-read` returns `{"value"}`;
//!   unassigned space reads all-ones and takes writes without effect, as
//!   the bus answers. The reply waits for the device's answer.
//!
//! Events: `DEVICE_ADDED {"id"}`, `DEVICE_DELETED {"id", "drain_ms"}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use switchboard_runtime::{AccessOp, AccessReply, ActorId};

use crate::host::control::{BusAccessRequest, CommandError, Controller, Events, CONTROL_ACTOR};
use crate::host::fleet::{self, Fleet, Serving};
use crate::host::topology::{
    check_device_against, parse_device, BlkSpec, BusSpec, DeviceSpec, Topology,
};
use crate::models::blk::BlkOptions;

/// The devices of `topology` as a log header lists them. A vhost-user
/// device's rebuild data comes in its `added` record, written when it
/// starts; an MMIO/PIO device's is known from the topology, and both its
/// header entry and its `added` record hold it. A bus is listed as not
/// replayed.
pub fn log_actors(topology: &Topology) -> Vec<switchboard_runtime::recording::ActorInfo> {
    let buses = topology
        .buses
        .iter()
        .map(|b| switchboard_runtime::recording::ActorInfo {
            id: b.id().to_string(),
            kind: "bus".to_string(),
            rebuild: None,
            not_replayable: Some(
                "a bus: its accesses are recorded, each answered by forwarding it to a device \
                 (whose own records are replayed), but a bus itself is not replayed"
                    .to_string(),
            ),
        });
    let devices = topology.devices.iter().map(|spec| {
        let not_replayable = match spec {
            DeviceSpec::VirtioFault(_) => Some(crate::models::fault::NOT_REPLAYABLE.to_string()),
            _ => None,
        };
        switchboard_runtime::recording::ActorInfo {
            id: spec.id().to_string(),
            kind: spec.kind_name().to_string(),
            rebuild: fleet::mmio_rebuild_info(spec),
            not_replayable,
        }
    });
    buses.chain(devices).collect()
}

/// The QEMU arguments that connect to a vhost-user device; `None` for a
/// device on a bus.
pub fn qemu_args(spec: &DeviceSpec) -> Option<String> {
    let (vu, driver, extra) = match spec {
        DeviceSpec::VirtioBlk(b) => (
            &b.vhost_user,
            "vhost-user-blk-pci",
            format!(",num-queues={}", b.vhost_user.queues),
        ),
        DeviceSpec::VirtioRng(r) => (&r.vhost_user, "vhost-user-rng-pci", String::new()),
        // An entropy device to the guest.
        DeviceSpec::VirtioFault(f) => (&f.vhost_user, "vhost-user-rng-pci", String::new()),
        DeviceSpec::Uart16550(_) | DeviceSpec::TestDevice(_) => return None,
    };
    Some(format!(
        "-chardev socket,id={id},path={} -device {driver},chardev={id}{extra}",
        vu.socket.display(),
        id = spec.id(),
    ))
}

/// One line about a device: where it is and, for vhost-user devices, the
/// QEMU arguments that connect to it.
pub fn describe(spec: &DeviceSpec) -> String {
    let kind = spec.kind();
    let what = match spec {
        DeviceSpec::VirtioBlk(b) => {
            let size = std::fs::metadata(&b.path).map_or(0, |m| m.len());
            format!(
                "{kind} on {} ({} MiB, {}, {} queue{}), socket {}",
                b.path.display(),
                size >> 20,
                if b.read_only {
                    "read-only"
                } else {
                    "read-write"
                },
                b.vhost_user.queues,
                if b.vhost_user.queues == 1 { "" } else { "s" },
                b.vhost_user.socket.display(),
            )
        }
        DeviceSpec::VirtioRng(r) => format!(
            "{kind}{}, socket {}",
            r.rate_limit
                .map(|l| format!(" limited to {l} bytes/s"))
                .unwrap_or_default(),
            r.vhost_user.socket.display(),
        ),
        DeviceSpec::Uart16550(u) => {
            format!(
                "{kind} on bus {} at {:#x}, output {}",
                u.bus, u.addr.0, u.output
            )
        }
        DeviceSpec::TestDevice(t) => format!(
            "{kind} on bus {} at {:#x}, reads take {} us",
            t.bus, t.addr.0, t.read_delay_us
        ),
        DeviceSpec::VirtioFault(f) => format!(
            "{kind} (fault-injection test device): panics in {} on request {}, \
             holding {}, socket {}",
            f.panic_in.name(),
            f.panic_after.saturating_add(1),
            f.hold,
            f.vhost_user.socket.display(),
        ),
    };
    match qemu_args(spec) {
        Some(args) => format!("{what}\n    qemu: {args}"),
        None => what,
    }
}

/// What `switchboard serve` says about a device that a topology file
/// cannot.
#[derive(Debug, Default)]
pub struct Tuning {
    /// An inherited socket and the number of queue workers.
    pub serving: Serving,
    /// virtio-blk: the largest virtqueue size accepted (default 256).
    pub queue_size: Option<u16>,
    /// virtio-blk: threads doing file I/O (default 4).
    pub io_threads: Option<usize>,
    /// virtio-blk, **test only**: latency added to every file operation
    /// ([`BlkOptions::latency`]).
    pub latency: std::time::Duration,
    /// virtio-blk, **test only**: every Nth file operation waits ten
    /// times `latency` ([`BlkOptions::latency_slow_every`]).
    pub latency_slow_every: u64,
    /// virtio-blk, **test only**: a panic fault ([`BlkOptions::test_panic`]).
    pub test_panic: Option<std::sync::Arc<crate::models::blk::PanicFault>>,
}

impl Tuning {
    /// `blk`'s device options with this tuning's.
    fn blk_options(&self, blk: &BlkSpec) -> BlkOptions {
        let mut options = blk.blk_options();
        if let Some(n) = self.queue_size {
            options.queue_size = n;
        }
        if let Some(n) = self.io_threads {
            options.io_threads = n;
        }
        options.latency = self.latency;
        options.latency_slow_every = self.latency_slow_every;
        options.test_panic.clone_from(&self.test_panic);
        options
    }
}

/// How to start a topology, beyond the topology itself.
#[derive(Debug)]
pub struct StartOptions {
    /// Record every device's messages to this log from its start on.
    pub recorder: Option<switchboard_runtime::recording::Recorder>,
    /// Tuning of some devices, by id.
    pub tuning: BTreeMap<String, Tuning>,
    /// Whether removals are recorded ([`Fleet::record_removals`]; default
    /// yes).
    pub record_removals: bool,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            recorder: None,
            tuning: BTreeMap::new(),
            record_removals: true,
        }
    }
}

/// How one device's start went.
#[derive(Debug)]
pub struct Started {
    /// Device id.
    pub id: String,
    /// A description, or why it did not start.
    pub result: Result<String, String>,
}

/// A running topology.
pub struct Runner {
    fleet: Arc<Fleet>,
    buses: Vec<BusSpec>,
    /// The specs of the devices running (or being removed).
    specs: Mutex<Vec<DeviceSpec>>,
    base_dir: PathBuf,
    events: Mutex<Option<Events>>,
    started: Instant,
    /// Serialises device-add checks with their start.
    adding: Mutex<()>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("fleet", &self.fleet)
            .finish()
    }
}

impl Runner {
    /// Starts a checked topology's buses and devices. A device that fails
    /// to start is reported in the list and the rest are started.
    pub fn start(topology: Topology, base_dir: &Path) -> std::io::Result<(Self, Vec<Started>)> {
        Self::start_recording(topology, base_dir, None)
    }

    /// As [`Runner::start`], recording every device's messages to
    /// `recorder` from its start on.
    pub fn start_recording(
        topology: Topology,
        base_dir: &Path,
        recorder: Option<switchboard_runtime::recording::Recorder>,
    ) -> std::io::Result<(Self, Vec<Started>)> {
        let options = StartOptions {
            recorder,
            ..StartOptions::default()
        };
        Self::start_with(topology, base_dir, options)
    }

    /// As [`Runner::start`], as `options` say.
    pub fn start_with(
        topology: Topology,
        base_dir: &Path,
        mut options: StartOptions,
    ) -> std::io::Result<(Self, Vec<Started>)> {
        let fleet = Arc::new(Fleet::new_recording(options.recorder)?);
        fleet.record_removals(options.record_removals);
        for bus in &topology.buses {
            fleet.add_bus(bus.id().as_str())?;
        }
        let mut specs = Vec::new();
        let mut report = Vec::new();
        for spec in topology.devices {
            let id = spec.id().to_string();
            let added = match (options.tuning.remove(&id), &spec) {
                (Some(tuning), DeviceSpec::VirtioBlk(blk)) => {
                    fleet.add_blk_serving(blk, &tuning.blk_options(blk), tuning.serving)
                }
                (Some(tuning), _) => fleet.add_serving(&spec, tuning.serving),
                (None, _) => fleet.add(&spec),
            };
            match added {
                Ok(()) => {
                    report.push(Started {
                        id,
                        result: Ok(describe(&spec)),
                    });
                    specs.push(spec);
                }
                Err(e) => report.push(Started {
                    id,
                    result: Err(e.to_string()),
                }),
            }
        }
        Ok((
            Runner {
                fleet,
                buses: topology.buses,
                specs: Mutex::new(specs),
                base_dir: base_dir.to_path_buf(),
                events: Mutex::default(),
                started: Instant::now(),
                adding: Mutex::default(),
            },
            report,
        ))
    }

    /// A QEMU command line that connects to every vhost-user device
    /// running (guest RAM in shared memory, as vhost-user needs), or `None`
    /// when there is none. Kernel, disk and other options are the user's.
    pub fn qemu_command(&self) -> Option<String> {
        let specs = self.specs.lock().unwrap_or_else(|e| e.into_inner());
        let args: Vec<String> = specs.iter().filter_map(qemu_args).collect();
        if args.is_empty() {
            return None;
        }
        Some(format!(
            "qemu-system-x86_64 -machine q35,memory-backend=mem -m 1G -smp 2 \\\n    -object memory-backend-memfd,id=mem,size=1G,share=on \\\n    {} \\\n    -kernel vmlinuz -append console=ttyS0 -nographic",
            args.join(" \\\n    ")
        ))
    }

    /// Whether every device has stopped by itself: each is a vhost-user
    /// device whose serving ended (it failed, or its socket did). `false`
    /// while one still serves, and with no device at all.
    pub fn all_stopped(&self) -> bool {
        let devices = self.fleet.query();
        !devices.is_empty()
            && devices
                .iter()
                .all(|d| d.state == switchboard_runtime::State::Stopped.to_string())
    }

    /// The fleet.
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Where events go (the control socket's clients).
    pub fn set_events(&self, events: Events) {
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(events);
    }

    fn emit(&self, event: &str, data: Value) {
        if let Some(e) = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            e.emit(event, data);
        }
    }

    /// Drains and stops every device; returns each one's drain time or
    /// error.
    pub fn shutdown(&self) -> Vec<(String, Result<Duration, fleet::Error>)> {
        let r = self.fleet.remove_all();
        self.specs.lock().unwrap_or_else(|e| e.into_inner()).clear();
        r
    }

    fn device_add(&self, arguments: &Map<String, Value>) -> Result<Value, CommandError> {
        let value = Value::Object(arguments.clone());
        let spec = parse_device(&value, "", &self.base_dir).map_err(|d| {
            CommandError::generic(
                d.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let running = self.specs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let errors = check_device_against(&self.buses, &running, &spec, "");
        if !errors.is_empty() {
            return Err(CommandError::generic(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        self.fleet
            .add(&spec)
            .map_err(|e| CommandError::generic(e.to_string()))?;
        let id = spec.id().to_string();
        let description = describe(&spec);
        self.specs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(spec);
        self.emit("DEVICE_ADDED", json!({ "id": id }));
        Ok(json!({ "id": id, "description": description }))
    }

    fn device_del(&self, arguments: &Map<String, Value>) -> Result<Value, CommandError> {
        let id = match arguments.get("id") {
            Some(Value::String(id)) => id.clone(),
            Some(other) => {
                return Err(CommandError::generic(format!(
                    "'id' must be a string, not {other}"
                )))
            }
            None => return Err(CommandError::generic("device-del needs 'id'")),
        };
        if let Some(extra) = arguments.keys().find(|k| *k != "id") {
            return Err(CommandError::generic(format!(
                "device-del takes only 'id', not '{extra}'"
            )));
        }
        match self.fleet.remove(&id) {
            Ok(drain) => {
                self.specs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|s| s.id().as_str() != id);
                let drain_ms = drain.as_secs_f64() * 1000.0;
                self.emit("DEVICE_DELETED", json!({ "id": id, "drain_ms": drain_ms }));
                Ok(json!({ "id": id, "drain_ms": drain_ms }))
            }
            Err(fleet::Error::NotFound(_)) => Err(CommandError::device_not_found(&id)),
            Err(e) => {
                // The fleet removed the device all the same (a failed device
                // ends its stop with its failure): its id and its files are
                // free for a new device.
                self.specs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|s| s.id().as_str() != id);
                Err(CommandError::generic(e.to_string()))
            }
        }
    }

    fn bus_access(
        &self,
        command: &str,
        arguments: &Map<String, Value>,
    ) -> Result<Value, CommandError> {
        let request = BusAccessRequest::parse(command, arguments)?;
        let spec = self
            .buses
            .iter()
            .find(|b| b.id().as_str() == request.bus)
            .ok_or_else(|| CommandError::generic(format!("{request}: no such bus")))?;
        request.check_within(spec.size())?;
        let bus = self
            .fleet
            .bus(&request.bus)
            .ok_or_else(|| CommandError::generic(format!("{request}: the bus is not running")))?;
        // The device whose region holds the address, to name it if it
        // refuses: looked up before the access, since a device that refuses
        // is being removed and may be gone from the list by the answer.
        let device = {
            let specs = self.specs.lock().unwrap_or_else(|e| e.into_inner());
            let a = u128::from(request.addr.0);
            specs.iter().find_map(|s| {
                let p = s.placement()?;
                (p.bus.as_str() == request.bus
                    && a >= u128::from(p.addr.0)
                    && a < u128::from(p.addr.0) + u128::from(p.size))
                .then(|| s.id().to_string())
            })
        };
        let from = ActorId::new(CONTROL_ACTOR);
        // Blocks this connection's thread only, until the device answers
        // (or refuses: a device stopped with the access in its mailbox or
        // pending answers it `Gone`).
        let answer = match request.op {
            AccessOp::Read => bus.read(&from, request.addr, request.size).wait(),
            AccessOp::Write { value } => bus.write(&from, request.addr, request.size, value).wait(),
        };
        match answer {
            Ok(AccessReply::Read { value }) => Ok(json!({ "value": value })),
            Ok(AccessReply::Written) => Ok(json!({})),
            Err(refused) => Err(request.refused(device.as_deref(), refused)),
        }
    }

    fn query_stats(&self) -> Value {
        let devices = self.fleet.query();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let buses: Vec<Value> = self
            .fleet
            .bus_stats()
            .into_iter()
            .map(|(id, s)| match s {
                Some(s) => json!({
                    "id": id,
                    "device_accesses": s.device_accesses,
                    "unassigned_reads": s.unassigned_reads,
                    "unassigned_writes": s.unassigned_writes,
                    "regions": s.regions,
                }),
                None => json!({ "id": id, "state": "unresponsive" }),
            })
            .collect();
        json!({
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "devices": devices.len(),
            "in_flight": devices.iter().map(|d| d.in_flight).sum::<u64>(),
            "handled": devices.iter().map(|d| d.handled).sum::<u64>(),
            "resident_kib": field("VmRSS:"),
            "threads": field("Threads:"),
            "buses": buses,
        })
    }
}

impl Controller for Runner {
    fn execute(
        &self,
        command: &str,
        arguments: &Map<String, Value>,
    ) -> Result<Value, CommandError> {
        match command {
            "query-devices" => Ok(serde_json::to_value(self.fleet.query())
                .map_err(|e| CommandError::generic(e.to_string()))?),
            "device-add" => self.device_add(arguments),
            "device-del" => self.device_del(arguments),
            "query-stats" => Ok(self.query_stats()),
            "query-failures" => Ok(serde_json::to_value(self.fleet.failures())
                .map_err(|e| CommandError::generic(e.to_string()))?),
            "bus-read" | "bus-write" => self.bus_access(command, arguments),
            other => Err(CommandError::command_not_found(other)),
        }
    }

    fn commands(&self) -> Vec<&'static str> {
        vec![
            "query-devices",
            "device-add",
            "device-del",
            "query-stats",
            "query-failures",
            "bus-read",
            "bus-write",
        ]
    }
}
