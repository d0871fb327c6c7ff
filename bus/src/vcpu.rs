// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The synchronous entry point of a bus for vCPU threads.
//!
//! A vCPU thread blocked in `KVM_RUN` is a plain OS thread, not a task on
//! an arbiter. Through [`BusHandle::access`] its access would wake the
//! arbiter thread, then the arbiter would wake it: two sleeping threads
//! per access, tens of microseconds. A [`VcpuPort`]
//! ([`BusHandle::vcpu`]) instead runs the access on the vCPU's own thread
//! whenever that keeps every guarantee of the actor path:
//!
//! 1. **Routing without a hop.** The bus actor publishes the device ranges
//!    of its flat view (`Routes`) on every change of its map, before it
//!    answers the change, with a generation number. A port keeps the
//!    snapshot it last loaded and reloads it when the generation moves: one
//!    atomic load per access, no lock, no reference count touched.
//! 2. **One admission path.** The access goes to the device's direct entry
//!    ([`DeviceRef::access_here`]), which admits it on the device's gate
//!    like every other access, and runs the device's code on this thread
//!    under the device's lock, only if the device has nothing queued or in
//!    hand; a draining, stopped or failed device refuses it with the same
//!    [`Refused`](switchboard_runtime::Refused), and a drain waits for it
//!    (see `switchboard_runtime::direct`).
//! 3. **No access into a removed device.** Once admitted, the port checks
//!    that the generation has not moved since it resolved the address. The
//!    bus publishes a removal before answering [`RemoveRegion`](crate::RemoveRegion), so an
//!    access admitted after that answer always sees the new generation:
//!    its admission is undone and it is routed again on the new map. An
//!    access admitted before is in flight, as one in the device's mailbox
//!    would be, and the drain that follows the removal waits for it.
//! 4. **The same journal.** The access is journalled as a message to the
//!    bus forwarded to the device, as the bus actor would journal it, so a
//!    recorded log replays the same whichever path an access took.
//! 5. **Ordering.** An access that would overtake a message already in the
//!    device's mailbox, an address that is not one device region in one
//!    piece (RAM, a hole, an access straddling two sections), all take the
//!    bus actor's path, exactly as [`BusHandle::access`] does. A port's own
//!    accesses are answered one at a time, in program order.
//!
//! An answer the device defers blocks the thread until it comes (parked on
//! its reply). Call a port from a plain thread only, never from a task on
//! an arbiter: the mailbox path blocks until the arbiter answers.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use switchboard_runtime::{
    AccessOp, AccessReply, AccessSize, ActorId, Answer, BusAddr, DeviceRef, DeviceRegion,
    GuestAccess, Here, RegionOffset, Via,
};

use crate::address_space::{BusAccess, BusHandle, Target};
use crate::region_map::RegionMap;

/// One flat range of a bus that maps to one device region.
#[derive(Clone, Debug)]
struct DeviceRange {
    start: u64,
    /// Never zero; `start + len` may be 2^64.
    len: u64,
    device: DeviceRef,
    region: DeviceRegion,
    /// The region offset `start` maps to.
    offset: u64,
}

/// The device ranges of a bus's flat view, sorted and disjoint, as the bus
/// last published them. RAM ranges are left out (an access to RAM takes
/// the bus actor's path, and a snapshot must not keep a mapping alive).
#[derive(Clone, Debug, Default)]
pub(crate) struct Routes {
    ranges: Vec<DeviceRange>,
}

impl Routes {
    fn of(map: &RegionMap<Target>) -> Self {
        let ranges = map
            .flat_view()
            .iter()
            .filter_map(|fr| match &fr.target {
                Target::Device { device, region } => Some(DeviceRange {
                    start: fr.start.0,
                    len: fr.len,
                    device: device.clone(),
                    region: *region,
                    offset: fr.offset.0,
                }),
                Target::Ram(_) => None,
            })
            .collect();
        Routes { ranges }
    }

    /// The device and the access it gets, if `access` falls in one piece
    /// inside one device range.
    fn device_access(&self, access: &BusAccess) -> Option<(&DeviceRef, GuestAccess)> {
        let addr = access.addr.0;
        let after = self.ranges.partition_point(|r| r.start <= addr);
        let r = self.ranges.get(after.checked_sub(1)?)?;
        let delta = addr - r.start;
        if delta >= r.len || r.len - delta < access.size.bytes() {
            return None;
        }
        Some((
            &r.device,
            GuestAccess {
                region: r.region,
                offset: RegionOffset(r.offset + delta),
                size: access.size,
                op: access.op,
            },
        ))
    }
}

/// What a bus shares with its ports: the routes and their generation.
#[derive(Debug, Default)]
pub(crate) struct Published {
    /// Raised by every publication, under the write lock, after the new
    /// routes are in place: a port that reads the same generation before
    /// and after an admission resolved on routes still current.
    generation: AtomicU64,
    /// Written by the bus actor only; read by a port only when the
    /// generation has moved.
    routes: RwLock<Arc<Routes>>,
}

impl Published {
    /// Publishes the device ranges of `map`. The bus calls this after every
    /// change of its map and before answering it.
    pub(crate) fn publish(&self, map: &RegionMap<Target>) {
        self.replace(Routes::of(map));
    }

    /// Publishes no routes (the bus stopped): every access takes the bus
    /// actor's path, which answers `Gone`.
    pub(crate) fn clear(&self) {
        self.replace(Routes::default());
    }

    fn replace(&self, routes: Routes) {
        // Only the bus actor writes, and it never panics holding the lock.
        let mut slot = self.routes.write().unwrap_or_else(|e| e.into_inner());
        *slot = Arc::new(routes);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn load(&self) -> (u64, Arc<Routes>) {
        let slot = self.routes.read().unwrap_or_else(|e| e.into_inner());
        (self.generation(), Arc::clone(&slot))
    }
}

/// Counters of one [`VcpuPort`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// Accesses answered on the port's thread (refusals included).
    pub here: u64,
    /// Accesses sent through the bus actor because the device had messages
    /// queued or in hand.
    pub busy: u64,
    /// Accesses sent through the bus actor because the address is not one
    /// device region in one piece (RAM, a hole, a straddling access).
    pub via_bus: u64,
    /// Admissions undone because the map changed meanwhile (each access
    /// then routed again).
    pub rerouted: u64,
}

/// A vCPU thread's synchronous entry point to one bus. See the module docs.
///
/// One per vCPU thread: it caches the bus's routes, so its methods take
/// `&mut self`. Cloning makes another port with its own counters.
///
/// ```
/// # use switchboard_bus::BusHandle;
/// # use switchboard_runtime::{AccessReply, AccessSize, ActorId, BusAddr, Runtime};
/// let sys = actix::System::new();
/// let arbiter = actix::Arbiter::new();
/// let bus = sys.block_on(async { BusHandle::start(&Runtime::new(), "pio", &arbiter.handle()) });
/// let mut port = bus.vcpu(ActorId::new("vcpu0"));
/// // A plain thread (this one): nothing is mapped, so the read is unassigned.
/// let r = port.read(BusAddr(0x80), AccessSize::B1);
/// assert_eq!(r, Ok(AccessReply::Read { value: 0xff }));
/// arbiter.stop();
/// ```
pub struct VcpuPort {
    me: ActorId,
    bus: BusHandle,
    published: Arc<Published>,
    /// The generation of `routes`.
    generation: u64,
    routes: Arc<Routes>,
    stats: VcpuStats,
}

impl Clone for VcpuPort {
    fn clone(&self) -> Self {
        VcpuPort {
            me: self.me.clone(),
            bus: self.bus.clone(),
            published: Arc::clone(&self.published),
            generation: self.generation,
            routes: Arc::clone(&self.routes),
            stats: VcpuStats::default(),
        }
    }
}

impl fmt::Debug for VcpuPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuPort")
            .field("me", &self.me)
            .field("bus", self.bus.id())
            .field("stats", &self.stats)
            .finish()
    }
}

impl VcpuPort {
    pub(crate) fn new(me: ActorId, bus: BusHandle, published: Arc<Published>) -> Self {
        let (generation, routes) = published.load();
        VcpuPort {
            me,
            bus,
            published,
            generation,
            routes,
            stats: VcpuStats::default(),
        }
    }

    /// The caller's actor id, as the journal names it.
    pub fn id(&self) -> &ActorId {
        &self.me
    }

    /// This port's counters.
    pub fn stats(&self) -> VcpuStats {
        self.stats
    }

    /// Performs one access and blocks until it is answered.
    pub fn access(&mut self, access: BusAccess) -> Answer<AccessReply> {
        loop {
            let now = self.published.generation();
            if now != self.generation {
                (self.generation, self.routes) = self.published.load();
            }
            let Some((device, ga)) = self.routes.device_access(&access) else {
                self.stats.via_bus += 1;
                return self.bus.access(&self.me, access).wait();
            };
            let (published, resolved_at) = (&self.published, self.generation);
            let still_routed = || published.generation() == resolved_at;
            let via = Via::new(self.bus.id(), &access);
            match device.access_here(&self.me, Some(via), ga, &still_routed) {
                Here::Answered(answer) => {
                    self.stats.here += 1;
                    return answer;
                }
                Here::Busy => {
                    self.stats.busy += 1;
                    return self.bus.access(&self.me, access).wait();
                }
                Here::Unrouted => self.stats.rerouted += 1,
            }
        }
    }

    /// Reads `size` bytes at `addr`.
    pub fn read(&mut self, addr: BusAddr, size: AccessSize) -> Answer<AccessReply> {
        self.access(BusAccess {
            addr,
            size,
            op: AccessOp::Read,
        })
    }

    /// Writes `value` (its low `size` bytes) at `addr`.
    pub fn write(&mut self, addr: BusAddr, size: AccessSize, value: u64) -> Answer<AccessReply> {
        self.access(BusAccess {
            addr,
            size,
            op: AccessOp::Write { value },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::{mpsc, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    use actix::{Arbiter, System, SystemRunner};
    use switchboard_runtime::{
        spawn_device, Completion, Deliver, Device, DeviceId, JournalRecord, MemoryJournal, Refused,
        Runtime, SpawnedDevice,
    };

    use super::*;
    use crate::memory::RamRegion;
    use crate::region_map::{Placement, RegionId, RegionKind, RegionSpec};

    const BASE: u64 = 0x1000;

    type Log = Arc<Mutex<Vec<String>>>;

    /// Reads answer `0x100 + offset`; writes and events are logged in the
    /// order the device takes them. Each access spins for `work`.
    struct Probe {
        log: Log,
        work: Duration,
    }

    impl Device for Probe {
        type Event = u64;

        fn kind(&self) -> &'static str {
            "probe"
        }

        fn access(&mut self, a: &GuestAccess) -> Completion {
            let start = Instant::now();
            while start.elapsed() < self.work {
                std::hint::spin_loop();
            }
            match a.op {
                AccessOp::Read => Completion::Ready(AccessReply::Read {
                    value: 0x100 + a.offset.0,
                }),
                AccessOp::Write { value } => {
                    self.log.lock().expect("log").push(format!("write {value}"));
                    Completion::Ready(AccessReply::Written)
                }
            }
        }

        fn event(&mut self, e: u64) {
            self.log.lock().expect("log").push(format!("event {e}"));
        }
    }

    fn me() -> ActorId {
        ActorId::new("vcpu0")
    }

    /// A bus with a probe at `BASE` (0x10 bytes) and RAM right after it,
    /// both actors on `arbiter`.
    fn plug(
        sys: &SystemRunner,
        rt: &Runtime,
        arbiter: &Arbiter,
        work: Duration,
    ) -> (BusHandle, SpawnedDevice<u64>, Log) {
        let log = Log::default();
        let probe = Probe {
            log: Arc::clone(&log),
            work,
        };
        let handle = arbiter.handle();
        let spawned = spawn_device(rt, DeviceId::new("probe"), probe, &handle, None);
        let bus = BusHandle::start(rt, "b", &handle);
        let ram = RamRegion::anonymous("ram", 0x10).expect("ram");
        sys.block_on(async {
            spawned.device.realize_and_start().await.expect("start");
            let dev = &spawned.device;
            bus.add_device(RegionId(1), dev, DeviceRegion(0), BusAddr(BASE), 0x10)
                .await
                .expect("plug");
            let spec = RegionSpec {
                size: 0x10,
                kind: RegionKind::Leaf(Target::Ram(ram)),
            };
            bus.add_region(RegionId(2), spec, Placement::root(BASE + 0x10, 0))
                .await
                .expect("ram");
        });
        (bus, spawned, log)
    }

    fn read(port: &mut VcpuPort, addr: u64, size: AccessSize) -> Answer<AccessReply> {
        port.read(BusAddr(addr), size)
    }

    /// The journal's records with the times left out.
    fn shape(journal: &MemoryJournal) -> Vec<String> {
        journal
            .records()
            .into_iter()
            .map(|r| match r {
                JournalRecord::Sent {
                    seq,
                    forwarded_from,
                    from,
                    to,
                    kind,
                    payload,
                    ..
                } => format!("{seq:?} {forwarded_from:?} {from} -> {to} {kind} {payload}"),
                JournalRecord::Replied { seq, reply, .. } => format!("{seq:?} {reply}"),
            })
            .collect()
    }

    #[test]
    fn test_a_port_journals_every_access_as_the_bus_actor_does() {
        let sys = System::new();
        let run = |through_port: bool| {
            let arbiter = Arbiter::new();
            let journal = Arc::new(MemoryJournal::new());
            let rt = Runtime::with_journal(journal.clone());
            let (bus, _dev, _) = plug(&sys, &rt, &arbiter, Duration::ZERO);
            let mut port = bus.vcpu(me());
            let accesses = [
                (BASE + 4, AccessSize::B4, None),
                (BASE, AccessSize::B1, Some(9)),
                (BASE + 0xe, AccessSize::B4, None),
                (BASE + 0x10, AccessSize::B2, Some(0xbeef)),
                (BASE + 0x10, AccessSize::B2, None),
                (0x9000, AccessSize::B8, None),
            ];
            let answers: Vec<_> = accesses
                .iter()
                .map(|&(addr, size, write)| {
                    let access = BusAccess {
                        addr: BusAddr(addr),
                        size,
                        op: write.map_or(AccessOp::Read, |value| AccessOp::Write { value }),
                    };
                    if through_port {
                        port.access(access)
                    } else {
                        bus.access(&me(), access).wait()
                    }
                })
                .collect();
            arbiter.stop();
            (answers, shape(&journal), port.stats())
        };
        let (actor_answers, actor_log) = {
            let (a, l, _) = run(false);
            (a, l)
        };
        let (port_answers, port_log, stats) = run(true);
        assert_eq!(port_answers, actor_answers);
        assert_eq!(port_log, actor_log);
        assert!(port_log.iter().any(|l| l.contains("bus:b -> dev:probe")));
        // Two whole device accesses on this thread; the straddling one,
        // RAM and the hole through the bus actor.
        assert_eq!(
            stats,
            VcpuStats {
                here: 2,
                busy: 0,
                via_bus: 4,
                rerouted: 0
            }
        );
        // Device bytes 0x0e and 0x0f (reads answer 0x100 + offset), then
        // two RAM bytes not written yet.
        assert_eq!(port_answers[2], Ok(AccessReply::Read { value: 0x0f0e }));
        assert_eq!(port_answers[4], Ok(AccessReply::Read { value: 0xbeef }));
        assert_eq!(port_answers[5], Ok(AccessReply::Read { value: u64::MAX }));
    }

    #[test]
    fn test_a_port_access_does_not_overtake_the_devices_queued_messages() {
        let sys = System::new();
        let arbiter = Arbiter::new();
        let rt = Runtime::new();
        let (bus, spawned, log) = plug(&sys, &rt, &arbiter, Duration::ZERO);
        // Hold the actors' arbiter so that what is sent to the device
        // waits in its mailbox.
        let (held_tx, held_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        arbiter.spawn(async move {
            held_tx.send(()).expect("test waits");
            let _ = release_rx.recv();
        });
        held_rx.recv().expect("arbiter held");
        let write = |value| GuestAccess {
            region: DeviceRegion(0),
            offset: RegionOffset(0),
            size: AccessSize::B4,
            op: AccessOp::Write { value },
        };
        let queued = spawned.device.access(&me(), write(1));
        spawned.events.do_send(Deliver(2));
        let mut port = bus.vcpu(me());
        let vcpu = thread::spawn(move || {
            let r = port.write(BusAddr(BASE), AccessSize::B4, 3);
            (r, port)
        });
        thread::sleep(Duration::from_millis(20));
        assert!(!vcpu.is_finished(), "answered while the device was held");
        assert!(log.lock().expect("log").is_empty());
        release_tx.send(()).expect("release");
        let (r, mut port) = vcpu.join().expect("vcpu thread");
        assert_eq!(r, Ok(AccessReply::Written));
        assert_eq!(queued.wait(), Ok(AccessReply::Written));
        assert_eq!(port.stats().busy, 1);
        // Nothing queued now: on this thread.
        assert_eq!(
            port.write(BusAddr(BASE), AccessSize::B4, 4),
            Ok(AccessReply::Written)
        );
        assert_eq!(port.stats().here, 1);
        assert_eq!(
            *log.lock().expect("log"),
            ["write 1", "event 2", "write 3", "write 4"]
        );
        arbiter.stop();
    }

    #[test]
    fn test_a_device_drained_while_mapped_refuses_port_accesses_typed() {
        let sys = System::new();
        let arbiter = Arbiter::new();
        let rt = Runtime::new();
        let (bus, spawned, _) = plug(&sys, &rt, &arbiter, Duration::ZERO);
        let mut port = bus.vcpu(me());
        assert_eq!(
            read(&mut port, BASE, AccessSize::B4),
            Ok(AccessReply::Read { value: 0x100 })
        );
        sys.block_on(spawned.device.drain(None)).expect("drained");
        assert_eq!(read(&mut port, BASE, AccessSize::B4), Err(Refused::Gone));
        assert_eq!(port.stats().here, 2);
        // Taken off the bus: unassigned, through the bus actor.
        sys.block_on(bus.remove_region(RegionId(1)))
            .expect("removed");
        assert_eq!(
            read(&mut port, BASE, AccessSize::B4),
            Ok(AccessReply::Read { value: 0xffff_ffff })
        );
        assert_eq!(port.stats().via_bus, 1);
        arbiter.stop();
    }

    #[test]
    fn test_unplug_under_ports_on_several_threads_waits_for_every_admitted_access() {
        let sys = System::new();
        let arbiter = Arbiter::new();
        let journal = Arc::new(MemoryJournal::new());
        let rt = Runtime::with_journal(journal.clone());
        let (bus, spawned, _) = plug(&sys, &rt, &arbiter, Duration::from_micros(20));
        let dev = spawned.device.clone();
        let stop = AtomicBool::new(false);
        let unplugged = AtomicBool::new(false);
        let (snapshot, threads) = thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|i| {
                    let mut port = bus.vcpu(ActorId::new(format!("vcpu{i}")));
                    let (stop, unplugged) = (&stop, &unplugged);
                    s.spawn(move || {
                        let mut after = Vec::new();
                        while !stop.load(Ordering::Acquire) {
                            let seen = unplugged.load(Ordering::Acquire);
                            let r = read(&mut port, BASE + 4, AccessSize::B4);
                            if seen {
                                after.push(r);
                            } else {
                                assert!(
                                    matches!(
                                        r,
                                        Ok(AccessReply::Read {
                                            value: 0x104 | 0xffff_ffff
                                        }) | Err(Refused::Draining | Refused::Gone)
                                    ),
                                    "{r:?}"
                                );
                            }
                        }
                        (port.stats(), after)
                    })
                })
                .collect();
            while dev.gate().in_flight() == 0 || journal.records().len() < 400 {
                thread::yield_now();
            }
            let report = sys
                .block_on(bus.unplug(&dev, &[RegionId(1)], Some(Duration::from_secs(10))))
                .expect("unplug");
            // The moment the drain answered: what the journal held then.
            let snapshot = journal.records();
            unplugged.store(true, Ordering::Release);
            assert_eq!(report.drain.id, DeviceId::new("probe"));
            assert_eq!(dev.gate().in_flight(), 0);
            thread::sleep(Duration::from_millis(10));
            stop.store(true, Ordering::Release);
            let threads: Vec<_> = threads
                .into_iter()
                .map(|t| t.join().expect("vcpu thread"))
                .collect();
            (snapshot, threads)
        });
        let here: u64 = threads.iter().map(|(s, _)| s.here).sum();
        assert!(here > 0, "no access ran on a vCPU thread: {threads:?}");
        for (_, after) in &threads {
            assert!(!after.is_empty());
            // Off the bus: unassigned, never the device.
            assert!(
                after
                    .iter()
                    .all(|r| *r == Ok(AccessReply::Read { value: 0xffff_ffff })),
                "{after:?}"
            );
        }
        // Every access the device answered had been answered when the
        // drain completed; what was in flight then was refused.
        let replied_then: std::collections::HashSet<u64> = snapshot
            .iter()
            .filter_map(|r| match r {
                JournalRecord::Replied { seq, .. } => Some(seq.0),
                JournalRecord::Sent { .. } => None,
            })
            .collect();
        let all = journal.records();
        let to_device: std::collections::HashSet<u64> = all
            .iter()
            .filter_map(|r| match r {
                JournalRecord::Sent { seq, to, .. } if to.as_str() == "dev:probe" => Some(seq.0),
                _ => None,
            })
            .collect();
        let mut answered_by_device = 0;
        for r in &all {
            let JournalRecord::Replied { seq, reply, .. } = r else {
                continue;
            };
            if to_device.contains(&seq.0) && reply.get("Ok").is_some() {
                answered_by_device += 1;
                assert!(
                    replied_then.contains(&seq.0),
                    "seq {} answered {reply} after the drain completed",
                    seq.0
                );
            }
        }
        assert!(answered_by_device > 0);
        arbiter.stop();
    }
}
