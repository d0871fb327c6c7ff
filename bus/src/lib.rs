// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Address spaces for switchboard: buses as actors, QEMU-style region maps,
//! and guest RAM with leases.
//!
//! - [`region_map`]: the map of device regions, RAM regions, aliases and
//!   containers with priorities, flattened the way QEMU's flat view is.
//! - [`address_space`]: the bus actor routing each [`BusAccess`] through the
//!   map to a device actor, to RAM, or to the unassigned behaviour; and
//!   [`BusHandle::unplug`], the unplug order (remove from routing, then drain).
//! - [`memory`]: RAM regions, [`Lease`]s and the [`GuestMemory`] API devices
//!   use for DMA.
//! - [`vcpu`]: [`VcpuPort`], a bus's synchronous entry point for vCPU
//!   threads, which runs an access on the caller's thread when the device is
//!   idle, through the same gate and journal.
//!
//! This crate builds on `switchboard-runtime` (actors, the send path, drain)
//! and is used by the devices in `switchboard-devices`.

#![deny(missing_docs)]

pub mod address_space;
pub mod memory;
pub mod region_map;
pub mod vcpu;

/// The address types of the runtime, re-exported for the region map.
pub use switchboard_runtime::addr;

pub use address_space::{
    AddRegion, AddressSpace, BusAccess, BusHandle, BusStats, DrainRegion, Error as BusError,
    MemoryEvent, MemoryRegionActor, QueryBusStats, RemoveRegion, Removed, Result as BusResult,
    Subscribe, Target, UnplugReport,
};
pub use memory::{
    Error as MemoryError, GuestAddr, GuestMemory, Lease, MemRequest, MemoryView, RamRange,
    RamRegion,
};
pub use region_map::{
    Error as RegionMapError, FlatRange, Parent, Placement, RegionId, RegionKind, RegionMap,
    RegionSpec, Resolved,
};
pub use vcpu::{VcpuPort, VcpuStats};
