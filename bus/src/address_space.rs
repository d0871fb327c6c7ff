// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The bus actor: one address space, routing guest accesses to the regions
//! mapped in it.
//!
//! [`AddressSpace`] owns a [`RegionMap`] whose leaves are device regions and
//! RAM regions. Each [`BusAccess`] is resolved through the map's flat view:
//!
//! - a device region: the access is forwarded to the device actor through the
//!   send path, with the caller's responder, so the device answers the caller
//!   directly (one hop there, none back through the bus);
//! - a RAM region: read or written here, under a lease;
//! - nothing: the bus's unassigned behaviour: reads return all-ones for the
//!   access size, writes are dropped, and both are counted.
//!
//! An access that straddles two flat sections (two regions, or a region and a
//! hole) is split into single-byte accesses, each routed on its own, and the
//! bytes are reassembled little-endian, as QEMU splits accesses at section
//! boundaries. Devices therefore see only accesses that fit in one region.
//!
//! # Removal and unplug ordering
//!
//! The bus handles its mailbox in order. An access handled before a
//! [`RemoveRegion`] has already been pushed into the device's mailbox when the
//! removal is handled; an access handled after it cannot resolve to the
//! region. So once `RemoveRegion` has been answered no new access reaches the
//! device, and a [`Drain`](switchboard_runtime::Drain) sent after that answer
//! queues behind every access the bus routed. [`BusHandle::unplug`] does
//! exactly this.
//!
//! Removing a RAM region also republishes the bus's [`GuestMemory`] view
//! without it, drains the region (the answer waits for every lease to be
//! returned) and then sends one [`MemoryEvent::Unmapped`] to every subscriber
//! that was told of the mapping.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use switchboard_runtime::{
    AccessOp, AccessReply, AccessSize, ActorId, Answer, BusAddr, DeviceRef, DeviceRegion,
    DrainError, DrainReport, Envelope, GuestAccess, RegionOffset, Reply, Request, Runtime, Sender,
};

use crate::memory::{GuestAddr, GuestMemory, MemoryView, RamRange, RamRegion};
use crate::region_map::{self, Placement, RegionId, RegionKind, RegionMap, RegionSpec};
use crate::vcpu::{Published, VcpuPort};

/// What a leaf of a bus's region map routes to.
#[derive(Clone)]
pub enum Target {
    /// One region of a device actor.
    Device {
        /// The device.
        device: DeviceRef,
        /// Which of its regions.
        region: DeviceRegion,
    },
    /// Guest RAM.
    Ram(Arc<RamRegion>),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Device { device, region } => f
                .debug_struct("Device")
                .field("device", device.id())
                .field("region", region)
                .finish(),
            Target::Ram(r) => f.debug_tuple("Ram").field(&r.name()).finish(),
        }
    }
}

/// Errors of the bus actor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The region map refused the addition.
    #[error("Add region {id} to bus {bus}")]
    AddRegion {
        /// The bus.
        bus: ActorId,
        /// The region.
        id: RegionId,
        /// Why.
        #[source]
        source: region_map::Error,
    },
    /// The region map refused the removal.
    #[error("Remove region {id} from bus {bus}")]
    RemoveRegion {
        /// The bus.
        bus: ActorId,
        /// The region.
        id: RegionId,
        /// Why.
        #[source]
        source: region_map::Error,
    },
    /// The bus actor is gone.
    #[error("Bus {bus} is gone")]
    Gone {
        /// The bus.
        bus: ActorId,
    },
    /// Draining the device after removing its regions failed or timed out.
    #[error("Drain device after removing it from bus {bus}")]
    DrainDevice {
        /// The bus.
        bus: ActorId,
        /// Why.
        #[source]
        source: DrainError,
    },
}

/// Result of bus operations.
pub type Result<T> = std::result::Result<T, Error>;

/// A guest access to a bus address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BusAccess {
    /// The address.
    pub addr: BusAddr,
    /// Width.
    pub size: AccessSize,
    /// Read or write.
    #[serde(flatten)]
    pub op: AccessOp,
}

impl Request for BusAccess {
    type Reply = AccessReply;

    fn kind(&self) -> &'static str {
        match self.op {
            AccessOp::Read => "bus-read",
            AccessOp::Write { .. } => "bus-write",
        }
    }
}

/// Adds a region to the bus.
#[derive(Debug, Message)]
#[rtype(result = "Result<()>")]
pub struct AddRegion {
    /// Its id, unique on this bus.
    pub id: RegionId,
    /// Size and kind.
    pub spec: RegionSpec<Target>,
    /// Where.
    pub placement: Placement,
}

/// Removes a region (with everything nested in it). Answered once no new
/// access can reach it and, for RAM, once it is drained.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "Result<Removed>")]
pub struct RemoveRegion {
    /// The region.
    pub id: RegionId,
}

/// What a removal took off the bus.
#[derive(Clone, Debug, Default)]
pub struct Removed {
    /// Device regions removed: the caller drains these devices.
    pub devices: Vec<(RegionId, DeviceRef)>,
    /// RAM regions removed, drained and announced as unmapped.
    pub ram: Vec<RegionId>,
}

/// A change to the RAM mapped on a bus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum MemoryEvent {
    /// A RAM region was mapped.
    Mapped {
        /// The region.
        id: RegionId,
        /// Its name.
        name: String,
        /// Its size.
        size: u64,
    },
    /// A RAM region that was announced `Mapped` is gone. Sent exactly once per
    /// `Mapped`, after the region has drained (or when the bus stops).
    Unmapped {
        /// The region.
        id: RegionId,
        /// `true` if every lease had been returned first; `false` only when
        /// the bus itself stopped with the region still mapped.
        drained: bool,
    },
}

/// Subscribes to [`MemoryEvent`]s. The subscriber is first told of every RAM
/// region already mapped.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Subscribe(pub Recipient<MemoryEvent>);

/// Asks for the bus's counters.
#[derive(Clone, Copy, Debug, Default, Message)]
#[rtype(result = "BusStats")]
pub struct QueryBusStats;

/// Counters of one bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusStats {
    /// Accesses forwarded to devices.
    pub device_accesses: u64,
    /// Accesses served from RAM.
    pub ram_accesses: u64,
    /// Reads that hit no region (answered all-ones).
    pub unassigned_reads: u64,
    /// Writes that hit no region (dropped).
    pub unassigned_writes: u64,
    /// Accesses split at a section boundary.
    pub split_accesses: u64,
    /// Regions currently in the map.
    pub regions: u64,
}

/// The bus actor. See the module docs.
pub struct AddressSpace {
    id: ActorId,
    map: RegionMap<Target>,
    stats: BusStats,
    memory: GuestMemory,
    subscribers: Vec<Recipient<MemoryEvent>>,
    /// RAM regions announced `Mapped` and not yet `Unmapped`, each with the
    /// actor that owns its mapping.
    announced: HashMap<RegionId, Addr<MemoryRegionActor>>,
    /// The device routes vCPU ports read, republished on every change of
    /// `map` before the change is answered (see [`crate::vcpu`]).
    routes: Arc<Published>,
}

impl fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddressSpace")
            .field("id", &self.id)
            .field("regions", &self.map.len())
            .finish()
    }
}

/// Where one access goes, decided synchronously from the flat view.
enum Route {
    Device(Sender<GuestAccess>, GuestAccess),
    Done(AccessReply),
}

impl AddressSpace {
    fn route_whole(&mut self, access: &BusAccess) -> Option<Route> {
        let size = access.size.bytes();
        let resolved = self.map.resolve(access.addr);
        let Some(r) = resolved else {
            // A hole: unassigned only if the whole access is in the hole.
            let last = access.addr.0.checked_add(size - 1)?;
            return (last == access.addr.0 || self.hole_covers(access.addr, size))
                .then(|| Route::Done(self.unassigned(access)));
        };
        if r.section_len < size {
            return None;
        }
        match r.target {
            Target::Device { device, region } => {
                self.stats.device_accesses += 1;
                Some(Route::Device(
                    device.sender().clone(),
                    GuestAccess {
                        region: *region,
                        offset: r.offset,
                        size: access.size,
                        op: access.op,
                    },
                ))
            }
            Target::Ram(ram) => {
                let ram = Arc::clone(ram);
                let offset = r.offset;
                Some(Route::Done(self.ram_access(&ram, offset, access)))
            }
        }
    }

    fn hole_covers(&self, addr: BusAddr, size: u64) -> bool {
        (1..size).all(|i| self.map.resolve(BusAddr(addr.0 + i)).is_none())
    }

    fn unassigned(&mut self, access: &BusAccess) -> AccessReply {
        match access.op {
            AccessOp::Read => {
                self.stats.unassigned_reads += 1;
                AccessReply::Read {
                    value: access.size.mask(),
                }
            }
            AccessOp::Write { .. } => {
                self.stats.unassigned_writes += 1;
                AccessReply::Written
            }
        }
    }

    fn ram_access(
        &mut self,
        ram: &Arc<RamRegion>,
        offset: RegionOffset,
        access: &BusAccess,
    ) -> AccessReply {
        let n = access.size.bytes() as usize;
        let Ok(lease) = ram.try_lease() else {
            // Removal takes a region out of the map before draining it, so
            // this is only reachable for a region drained by someone else.
            return self.unassigned(access);
        };
        self.stats.ram_accesses += 1;
        let mut bytes = [0u8; 8];
        match access.op {
            AccessOp::Read => match lease.read(offset.0, &mut bytes[..n]) {
                Ok(()) => AccessReply::Read {
                    value: u64::from_le_bytes(bytes),
                },
                Err(_) => self.unassigned(access),
            },
            AccessOp::Write { value } => {
                bytes.copy_from_slice(&value.to_le_bytes());
                match lease.write(offset.0, &bytes[..n]) {
                    Ok(()) => AccessReply::Written,
                    Err(_) => self.unassigned(access),
                }
            }
        }
    }

    /// Splits an access into bytes, each routed on its own; answers when all
    /// bytes are answered.
    fn split(&mut self, env: Envelope<BusAccess>, ctx: &mut Context<Self>) {
        self.stats.split_accesses += 1;
        let access = env.msg;
        let n = access.size.bytes();
        let mut parts: Vec<Part> = Vec::with_capacity(n as usize);
        for i in 0..n {
            let Some(addr) = access.addr.0.checked_add(i) else {
                parts.push(Part::Done(0xff));
                continue;
            };
            let op = match access.op {
                AccessOp::Read => AccessOp::Read,
                AccessOp::Write { value } => AccessOp::Write {
                    value: (value >> (8 * i)) & 0xff,
                },
            };
            let byte = BusAccess {
                addr: BusAddr(addr),
                size: AccessSize::B1,
                op,
            };
            match self.route_whole(&byte) {
                Some(Route::Device(device, ga)) => {
                    parts.push(Part::Waiting(device.send(&self.id, ga)))
                }
                Some(Route::Done(AccessReply::Read { value })) => {
                    parts.push(Part::Done(value as u8))
                }
                Some(Route::Done(AccessReply::Written)) => parts.push(Part::Done(0)),
                // A one-byte access always fits in one section.
                None => parts.push(Part::Done(0xff)),
            }
        }
        let reply = env.reply;
        ctx.spawn(
            async move {
                let mut value = 0u64;
                for (i, part) in parts.into_iter().enumerate() {
                    let byte = match part {
                        Part::Done(b) => b,
                        Part::Waiting(r) => match r.await {
                            Ok(AccessReply::Read { value }) => value as u8,
                            Ok(AccessReply::Written) => 0,
                            Err(refused) => return reply.reply(Err(refused)),
                        },
                    };
                    value |= u64::from(byte) << (8 * i);
                }
                let answer: Answer<AccessReply> = Ok(match access.op {
                    AccessOp::Read => AccessReply::Read { value },
                    AccessOp::Write { .. } => AccessReply::Written,
                });
                reply.reply(answer);
            }
            .into_actor(self),
        );
    }

    fn publish_memory(&self) {
        let ranges = self
            .map
            .flat_view()
            .iter()
            .filter_map(|fr| match &fr.target {
                Target::Ram(region) => Some(RamRange {
                    start: GuestAddr(fr.start.0),
                    len: fr.len,
                    region: Arc::clone(region),
                    offset: fr.offset.0,
                }),
                Target::Device { .. } => None,
            })
            .collect();
        self.memory.publish(MemoryView::new(ranges));
    }
}

enum Part {
    Done(u8),
    Waiting(Reply<AccessReply>),
}

/// Room for control messages in the mailbox; accesses do not count.
const CONTROL_MAILBOX_CAPACITY: usize = 4096;

impl Actor for AddressSpace {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Accesses use `do_send`, which ignores the capacity; control
        // messages (drain, status, region changes) are sent eagerly while
        // fewer than this many wait, and when polled after that.
        ctx.set_mailbox_capacity(CONTROL_MAILBOX_CAPACITY);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Every `Mapped` gets its `Unmapped`, even when the bus goes first.
        for id in self.announced.keys() {
            for s in &self.subscribers {
                s.do_send(MemoryEvent::Unmapped {
                    id: *id,
                    drained: false,
                });
            }
        }
        self.announced.clear();
        self.memory.publish(MemoryView::default());
        self.routes.clear();
    }
}

impl Handler<Envelope<BusAccess>> for AddressSpace {
    type Result = ();

    fn handle(&mut self, env: Envelope<BusAccess>, ctx: &mut Context<Self>) {
        // The hot path, a whole access to a device region, forwards without
        // cloning anything out of the map.
        if let Some(r) = self.map.resolve(env.msg.addr) {
            if let (Target::Device { device, region }, true) =
                (r.target, r.section_len >= env.msg.size.bytes())
            {
                self.stats.device_accesses += 1;
                let access = GuestAccess {
                    region: *region,
                    offset: r.offset,
                    size: env.msg.size,
                    op: env.msg.op,
                };
                device.sender().forward(&self.id, access, env.reply);
                return;
            }
        }
        match self.route_whole(&env.msg) {
            Some(Route::Device(device, access)) => device.forward(&self.id, access, env.reply),
            Some(Route::Done(reply)) => env.reply.reply(Ok(reply)),
            None => self.split(env, ctx),
        }
    }
}

impl Handler<AddRegion> for AddressSpace {
    type Result = Result<()>;

    fn handle(&mut self, msg: AddRegion, _: &mut Context<Self>) -> Self::Result {
        let ram = match &msg.spec.kind {
            RegionKind::Leaf(Target::Ram(r)) => Some(Arc::clone(r)),
            _ => None,
        };
        let size = msg.spec.size;
        self.map
            .add(msg.id, msg.spec, msg.placement)
            .map_err(|source| Error::AddRegion {
                bus: self.id.clone(),
                id: msg.id,
                source,
            })?;
        self.stats.regions = self.map.len() as u64;
        self.routes.publish(&self.map);
        if let Some(ram) = ram {
            self.publish_memory();
            let event = MemoryEvent::Mapped {
                id: msg.id,
                name: ram.name().to_string(),
                size,
            };
            for s in &self.subscribers {
                s.do_send(event.clone());
            }
            let owner = MemoryRegionActor { region: Some(ram) }.start();
            self.announced.insert(msg.id, owner);
        }
        Ok(())
    }
}

impl Handler<RemoveRegion> for AddressSpace {
    type Result = ResponseActFuture<Self, Result<Removed>>;

    fn handle(&mut self, msg: RemoveRegion, _: &mut Context<Self>) -> Self::Result {
        let removed = match self.map.remove(msg.id) {
            Ok(removed) => removed,
            Err(source) => {
                let err = Error::RemoveRegion {
                    bus: self.id.clone(),
                    id: msg.id,
                    source,
                };
                return Box::pin(actix::fut::ready(Err(err)));
            }
        };
        self.stats.regions = self.map.len() as u64;
        // Before the answer: no vCPU port admits an access to a removed
        // device once the removal is answered.
        self.routes.publish(&self.map);
        let mut out = Removed::default();
        let mut drains = Vec::new();
        for (id, target) in removed {
            match target {
                Target::Device { device, .. } => out.devices.push((id, device)),
                Target::Ram(_) => {
                    if let Some(owner) = self.announced.remove(&id) {
                        drains.push((id, owner.send(DrainRegion)));
                    }
                }
            }
        }
        if !drains.is_empty() {
            self.publish_memory();
        }
        // Only subscribers that were told of the mapping hear of its end; all
        // current subscribers were (at `AddRegion` or at `Subscribe`).
        let subscribers = self.subscribers.clone();
        Box::pin(
            async move {
                for (id, drained) in drains {
                    // A region actor that is already gone has dropped its
                    // mapping, so it is drained all the same.
                    let _ = drained.await;
                    for s in &subscribers {
                        s.do_send(MemoryEvent::Unmapped { id, drained: true });
                    }
                    out.ram.push(id);
                }
                Ok(out)
            }
            .into_actor(self),
        )
    }
}

impl Handler<Subscribe> for AddressSpace {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) {
        for (id, target) in self.map.leaves() {
            if let (Target::Ram(ram), true) = (target, self.announced.contains_key(&id)) {
                msg.0.do_send(MemoryEvent::Mapped {
                    id,
                    name: ram.name().to_string(),
                    size: ram.size(),
                });
            }
        }
        self.subscribers.push(msg.0);
    }
}

impl Handler<QueryBusStats> for AddressSpace {
    type Result = MessageResult<QueryBusStats>;

    fn handle(&mut self, _: QueryBusStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.stats)
    }
}

/// Drains a [`MemoryRegionActor`]'s region; answered when the last lease is
/// returned, after which the actor drops its mapping and stops.
#[derive(Clone, Copy, Debug, Default, Message)]
#[rtype(result = "()")]
pub struct DrainRegion;

/// The actor that owns one RAM mapping while it is on a bus.
///
/// The data path never messages it: devices and the bus read and write the
/// region under leases. It exists for the control path: it serialises the
/// region's drain and holds the mapping until the drain has completed, so
/// the mapping's lifetime is the actor's.
#[derive(Debug)]
pub struct MemoryRegionActor {
    /// `None` once drained.
    region: Option<Arc<RamRegion>>,
}

impl Actor for MemoryRegionActor {
    type Context = Context<Self>;
}

impl Handler<DrainRegion> for MemoryRegionActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: DrainRegion, _: &mut Context<Self>) -> Self::Result {
        let drained = self.region.as_ref().map(|r| r.drain());
        Box::pin(
            async move {
                if let Some(d) = drained {
                    d.await;
                }
            }
            .into_actor(self)
            .map(|(), act, ctx| {
                act.region = None;
                ctx.stop();
            }),
        )
    }
}

/// A handle to a bus actor. Cheap to clone.
#[derive(Clone)]
pub struct BusHandle {
    id: ActorId,
    access: Sender<BusAccess>,
    addr: Addr<AddressSpace>,
    memory: GuestMemory,
    routes: Arc<Published>,
}

impl fmt::Debug for BusHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusHandle").field("id", &self.id).finish()
    }
}

/// What [`BusHandle::unplug`] did.
#[derive(Clone, Debug)]
pub struct UnplugReport {
    /// The regions taken off the bus.
    pub regions: Vec<RegionId>,
    /// The device's drain.
    pub drain: DrainReport,
}

impl BusHandle {
    /// Starts a bus named `name` on `arbiter`.
    pub fn start(runtime: &Runtime, name: &str, arbiter: &ArbiterHandle) -> BusHandle {
        let id = ActorId::new(format!("bus:{name}"));
        let memory = GuestMemory::default();
        let routes = Arc::new(Published::default());
        let actor = AddressSpace {
            id: id.clone(),
            map: RegionMap::new(),
            stats: BusStats::default(),
            memory: memory.clone(),
            subscribers: Vec::new(),
            announced: HashMap::new(),
            routes: Arc::clone(&routes),
        };
        let addr = AddressSpace::start_in_arbiter(arbiter, move |_| actor);
        BusHandle {
            access: runtime.sender(id.clone(), addr.clone().recipient()),
            id,
            addr,
            memory,
            routes,
        }
    }

    /// A synchronous entry point for the plain thread of vCPU `me` (see
    /// [`crate::vcpu`]): its accesses run on that thread when the device
    /// is idle, and take this bus's mailbox path otherwise.
    pub fn vcpu(&self, me: ActorId) -> VcpuPort {
        VcpuPort::new(me, self.clone(), Arc::clone(&self.routes))
    }

    /// The bus's actor id.
    pub fn id(&self) -> &ActorId {
        &self.id
    }

    /// The send path to the bus.
    pub fn sender(&self) -> &Sender<BusAccess> {
        &self.access
    }

    /// The RAM mapped on this bus, for devices doing DMA.
    pub fn guest_memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Sends one access.
    pub fn access(&self, from: &ActorId, access: BusAccess) -> Reply<AccessReply> {
        self.access.send(from, access)
    }

    /// Reads `size` bytes at `addr`.
    pub fn read(&self, from: &ActorId, addr: BusAddr, size: AccessSize) -> Reply<AccessReply> {
        self.access(
            from,
            BusAccess {
                addr,
                size,
                op: AccessOp::Read,
            },
        )
    }

    /// Writes `value` (its low `size` bytes) at `addr`.
    pub fn write(
        &self,
        from: &ActorId,
        addr: BusAddr,
        size: AccessSize,
        value: u64,
    ) -> Reply<AccessReply> {
        self.access(
            from,
            BusAccess {
                addr,
                size,
                op: AccessOp::Write { value },
            },
        )
    }

    /// Adds a region. The message is sent when this is called.
    pub fn add_region(
        &self,
        id: RegionId,
        spec: RegionSpec<Target>,
        placement: Placement,
    ) -> impl std::future::Future<Output = Result<()>> + 'static {
        let req = self.addr.send(AddRegion {
            id,
            spec,
            placement,
        });
        let bus = self.id.clone();
        async move { req.await.unwrap_or(Err(Error::Gone { bus })) }
    }

    /// Maps `size` bytes of `device`'s `region` at `base` on the root of the bus.
    pub fn add_device(
        &self,
        id: RegionId,
        device: &DeviceRef,
        region: DeviceRegion,
        base: BusAddr,
        size: u64,
    ) -> impl std::future::Future<Output = Result<()>> + 'static {
        self.add_region(
            id,
            RegionSpec {
                size,
                kind: RegionKind::Leaf(Target::Device {
                    device: device.clone(),
                    region,
                }),
            },
            Placement::root(base.0, 0),
        )
    }

    /// Removes a region. The message is sent when this is called.
    pub fn remove_region(
        &self,
        id: RegionId,
    ) -> impl std::future::Future<Output = Result<Removed>> + 'static {
        let req = self.addr.send(RemoveRegion { id });
        let bus = self.id.clone();
        async move { req.await.unwrap_or(Err(Error::Gone { bus })) }
    }

    /// Subscribes to RAM map and unmap events.
    pub fn subscribe(&self, to: Recipient<MemoryEvent>) {
        self.addr.do_send(Subscribe(to));
    }

    /// The bus's counters.
    pub async fn stats(&self) -> Result<BusStats> {
        self.addr
            .send(QueryBusStats)
            .await
            .map_err(|_| Error::Gone {
                bus: self.id.clone(),
            })
    }

    /// Unplugs a device: takes `regions` off the bus (after which no access
    /// reaches the device through this bus), then drains the device, which
    /// answers once every access it accepted has been answered.
    pub async fn unplug(
        &self,
        device: &DeviceRef,
        regions: &[RegionId],
        deadline: Option<Duration>,
    ) -> Result<UnplugReport> {
        for id in regions {
            self.remove_region(*id).await?;
        }
        let drain = device
            .drain(deadline)
            .await
            .map_err(|source| Error::DrainDevice {
                bus: self.id.clone(),
                source,
            })?;
        Ok(UnplugReport {
            regions: regions.to_vec(),
            drain,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use switchboard_runtime::{Completion, Device, DeviceId, Refused};

    use super::*;

    /// Reads return `0x1000 * region + offset`; writes are logged.
    struct Echo {
        writes: Arc<Mutex<Vec<(u64, u64, u64)>>>,
    }

    impl Device for Echo {
        type Event = ();

        fn kind(&self) -> &'static str {
            "echo"
        }

        fn access(&mut self, a: &GuestAccess) -> Completion {
            match a.op {
                AccessOp::Read => Completion::Ready(AccessReply::Read {
                    value: 0x1000 * u64::from(a.region.0) + a.offset.0,
                }),
                AccessOp::Write { value } => {
                    self.writes
                        .lock()
                        .expect("log")
                        .push((a.offset.0, a.size.bytes(), value));
                    Completion::Ready(AccessReply::Written)
                }
            }
        }
    }

    type Log = Arc<Mutex<Vec<String>>>;

    /// Records memory events into a shared log.
    struct Recorder {
        name: &'static str,
        log: Log,
    }

    impl Actor for Recorder {
        type Context = Context<Self>;
    }

    impl Handler<MemoryEvent> for Recorder {
        type Result = ();

        fn handle(&mut self, ev: MemoryEvent, _: &mut Context<Self>) {
            let line = match ev {
                MemoryEvent::Mapped { id, .. } => format!("{}: mapped {}", self.name, id.0),
                MemoryEvent::Unmapped { id, drained } => {
                    format!("{}: unmapped {} drained={drained}", self.name, id.0)
                }
            };
            self.log.lock().expect("log").push(line);
        }
    }

    fn me() -> ActorId {
        ActorId::new("test")
    }

    async fn echo_on(
        bus: &BusHandle,
        rt: &Runtime,
        base: u64,
        size: u64,
    ) -> (DeviceRef, Arc<Mutex<Vec<(u64, u64, u64)>>>) {
        let writes = Arc::default();
        let dev = switchboard_runtime::spawn_device(
            rt,
            DeviceId::new("echo"),
            Echo {
                writes: Arc::clone(&writes),
            },
            &Arbiter::current(),
            None,
        )
        .device;
        dev.realize_and_start().await.expect("start");
        bus.add_device(RegionId(base), &dev, DeviceRegion(1), BusAddr(base), size)
            .await
            .expect("add");
        (dev, writes)
    }

    fn ram_spec(ram: &Arc<RamRegion>) -> RegionSpec<Target> {
        RegionSpec {
            size: ram.size(),
            kind: RegionKind::Leaf(Target::Ram(Arc::clone(ram))),
        }
    }

    #[actix_rt::test]
    async fn test_unassigned_reads_all_ones_and_drops_writes_counted() {
        let rt = Runtime::new();
        let bus = BusHandle::start(&rt, "b", &Arbiter::current());
        for size in [
            AccessSize::B1,
            AccessSize::B2,
            AccessSize::B4,
            AccessSize::B8,
        ] {
            let r = bus.read(&me(), BusAddr(0x40), size).await;
            assert_eq!(r, Ok(AccessReply::Read { value: size.mask() }));
        }
        let w = bus.write(&me(), BusAddr(0x40), AccessSize::B4, 1).await;
        assert_eq!(w, Ok(AccessReply::Written));
        let stats = bus.stats().await.expect("stats");
        assert_eq!(stats.unassigned_reads, 4);
        assert_eq!(stats.unassigned_writes, 1);
        assert_eq!(stats.device_accesses, 0);
    }

    #[actix_rt::test]
    async fn test_device_access_arrives_at_region_offset() {
        let rt = Runtime::new();
        let bus = BusHandle::start(&rt, "b", &Arbiter::current());
        let (_dev, writes) = echo_on(&bus, &rt, 0x3f8, 8).await;
        let r = bus.read(&me(), BusAddr(0x3fa), AccessSize::B1).await;
        assert_eq!(r, Ok(AccessReply::Read { value: 0x1002 }));
        bus.write(&me(), BusAddr(0x3fc), AccessSize::B2, 0xbeef)
            .await
            .expect("write");
        assert_eq!(*writes.lock().expect("log"), vec![(4, 2, 0xbeef)]);
        assert_eq!(bus.stats().await.expect("stats").device_accesses, 2);
    }

    #[actix_rt::test]
    async fn test_straddling_access_is_split_into_bytes() {
        let rt = Runtime::new();
        let bus = BusHandle::start(&rt, "b", &Arbiter::current());
        // Device at [0x100, 0x104); RAM at [0x104, 0x108); hole after.
        let (_dev, writes) = echo_on(&bus, &rt, 0x100, 4).await;
        let ram = RamRegion::anonymous("ram", 4).expect("ram");
        bus.add_region(RegionId(2), ram_spec(&ram), Placement::root(0x104, 0))
            .await
            .expect("add ram");
        // Bytes 0x102,0x103 from the device (0x1002, 0x1003 -> 02, 03), then RAM.
        bus.write(&me(), BusAddr(0x104), AccessSize::B2, 0xbbaa)
            .await
            .expect("ram write");
        let r = bus.read(&me(), BusAddr(0x102), AccessSize::B4).await;
        assert_eq!(r, Ok(AccessReply::Read { value: 0xbbaa_0302 }));
        // RAM byte 0x107 then the hole at 0x108.
        let r = bus.read(&me(), BusAddr(0x107), AccessSize::B2).await;
        assert_eq!(r, Ok(AccessReply::Read { value: 0xff00 }));
        // A split write reaches the device one byte at a time.
        bus.write(&me(), BusAddr(0x103), AccessSize::B2, 0x4433)
            .await
            .expect("split write");
        assert_eq!(*writes.lock().expect("log"), vec![(3, 1, 0x33)]);
        let mut req = bus.guest_memory().request();
        let mut b = [0u8; 1];
        req.read(GuestAddr(0x104), &mut b).expect("read ram");
        assert_eq!(b[0], 0x44);
        let stats = bus.stats().await.expect("stats");
        assert_eq!(stats.split_accesses, 3);
        assert_eq!(stats.unassigned_reads, 1);
    }

    #[actix_rt::test]
    async fn test_access_wrapping_past_the_top_of_the_space_does_not_panic() {
        let rt = Runtime::new();
        let bus = BusHandle::start(&rt, "b", &Arbiter::current());
        let r = bus.read(&me(), BusAddr(u64::MAX - 1), AccessSize::B4).await;
        assert_eq!(r, Ok(AccessReply::Read { value: 0xffff_ffff }));
    }

    #[actix_rt::test]
    async fn test_lease_held_across_region_removal_delays_the_reply() {
        let rt = Runtime::new();
        let bus = BusHandle::start(&rt, "mem", &Arbiter::current());
        let log: Log = Arc::default();
        let sub = Recorder {
            name: "sub",
            log: Arc::clone(&log),
        }
        .start();
        bus.subscribe(sub.recipient());
        let ram = RamRegion::anonymous("ram0", 0x1000).expect("ram");
        bus.add_region(RegionId(7), ram_spec(&ram), Placement::root(0x10_0000, 0))
            .await
            .expect("add");
        // A device request in progress holds a lease on the region.
        let mut req = bus.guest_memory().request();
        req.write(GuestAddr(0x10_0010), b"dma").expect("dma write");
        assert_eq!(ram.leases(), 1);

        let mut removal = Box::pin(bus.remove_region(RegionId(7)));
        // Once a later message has been answered, the removal has been handled.
        bus.stats().await.expect("stats");
        assert!(
            futures::poll!(&mut removal).is_pending(),
            "acked with a lease held"
        );
        // Already out of routing and out of the published memory.
        let r = bus.read(&me(), BusAddr(0x10_0010), AccessSize::B1).await;
        assert_eq!(r, Ok(AccessReply::Read { value: 0xff }));
        let mut fresh = bus.guest_memory().request();
        let mut b = [0u8; 3];
        assert!(fresh.read(GuestAddr(0x10_0010), &mut b).is_err());
        // The stale request can still use the lease it holds, but not lease anew.
        req.read(GuestAddr(0x10_0010), &mut b).expect("held lease");
        assert_eq!(&b, b"dma");

        log.lock().expect("log").push("lease returned".into());
        drop(req);
        let removed = removal.await.expect("removed");
        log.lock().expect("log").push("removal acked".into());
        assert_eq!(removed.ram, vec![RegionId(7)]);
        assert!(ram.is_drained());
        // Let the subscriber's mailbox run.
        actix_rt::time::sleep(Duration::from_millis(10)).await;
        let log = log.lock().expect("log").clone();
        assert_eq!(
            log,
            vec![
                "sub: mapped 7",
                "lease returned",
                "sub: unmapped 7 drained=true",
                "removal acked",
            ]
        );
    }

    #[actix_rt::test]
    async fn test_every_mapped_event_gets_exactly_one_unmapped() {
        let rt = Runtime::new();
        let arbiter = Arbiter::new();
        let bus = BusHandle::start(&rt, "mem", &arbiter.handle());
        let log: Log = Arc::default();
        let early = Recorder {
            name: "early",
            log: Arc::clone(&log),
        }
        .start();
        bus.subscribe(early.recipient());
        for i in 1..=3u64 {
            let ram = RamRegion::anonymous(format!("r{i}"), 0x1000).expect("ram");
            bus.add_region(RegionId(i), ram_spec(&ram), Placement::root(i * 0x1000, 0))
                .await
                .expect("add");
        }
        let late = Recorder {
            name: "late",
            log: Arc::clone(&log),
        }
        .start();
        bus.subscribe(late.recipient());
        bus.remove_region(RegionId(2)).await.expect("remove");
        // Stopping the bus unmaps what is left.
        arbiter.stop();
        arbiter.join().expect("join");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
        let log = log.lock().expect("log").clone();
        for who in ["early", "late"] {
            for id in 1..=3 {
                let mapped = log
                    .iter()
                    .filter(|l| **l == format!("{who}: mapped {id}"))
                    .count();
                let unmapped = log
                    .iter()
                    .filter(|l| l.starts_with(&format!("{who}: unmapped {id} ")))
                    .count();
                assert_eq!((mapped, unmapped), (1, 1), "{who} region {id}: {log:?}");
            }
        }
        assert!(log.contains(&"early: unmapped 2 drained=true".to_string()));
        assert!(log.contains(&"late: unmapped 3 drained=false".to_string()));
    }

    #[actix_rt::test]
    async fn test_unplug_takes_device_off_the_bus_then_drains_it() {
        let rt = Runtime::new();
        let bus = BusHandle::start(&rt, "b", &Arbiter::current());
        let (dev, _) = echo_on(&bus, &rt, 0x1000, 0x10).await;
        let report = bus
            .unplug(&dev, &[RegionId(0x1000)], Some(Duration::from_secs(5)))
            .await
            .expect("unplug");
        assert_eq!(report.drain.id, DeviceId::new("echo"));
        let r = bus.read(&me(), BusAddr(0x1000), AccessSize::B4).await;
        assert_eq!(r, Ok(AccessReply::Read { value: 0xffff_ffff }));
        assert_eq!(
            dev.access(
                &me(),
                GuestAccess {
                    region: DeviceRegion(1),
                    offset: RegionOffset(0),
                    size: AccessSize::B4,
                    op: AccessOp::Read
                }
            )
            .await,
            Err(Refused::Gone)
        );
        let err = bus
            .remove_region(RegionId(0x1000))
            .await
            .expect_err("twice");
        assert!(err.to_string().contains("Remove region"), "{err}");
    }
}
