// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The actor core of switchboard.
//!
//! Every device is a [`DeviceActor`] hosting a [`Device`]; every guest access
//! reaches it as a [`GuestAccess`] message through the one send path
//! ([`Sender`]), which numbers it, counts it in flight until its reply is sent,
//! and shows it to a [`Journal`]. A device follows the lifecycle
//! `Created -> Realized -> Running -> Draining -> Stopped` ([`State`]); a
//! [`Drain`] completes only once every access the device accepted has been
//! answered, and a panic in a device stops that device alone and is reported
//! to the [`Supervisor`].
//!
//! A plain thread (a vCPU in `KVM_RUN`) can run an access on its own thread
//! instead, through the same gate and journal, when the device has nothing
//! queued or in hand ([`DeviceRef::access_here`], see [`direct`]).
//!
//! Buses (address spaces) and guest memory build on this crate in
//! `switchboard-bus`; the devices themselves live in `switchboard-devices`.
//!
//! ```
//! use switchboard_runtime::{
//!     spawn_device, AccessOp, AccessReply, AccessSize, ActorId, Completion, Device,
//!     DeviceId, DeviceRegion, GuestAccess, RegionOffset, Runtime,
//! };
//!
//! struct Answer42;
//! impl Device for Answer42 {
//!     type Event = ();
//!     fn kind(&self) -> &'static str { "answer" }
//!     fn access(&mut self, _: &GuestAccess) -> Completion {
//!         Completion::Ready(AccessReply::Read { value: 42 })
//!     }
//! }
//!
//! actix::System::new().block_on(async {
//!     let rt = Runtime::new();
//!     let spawned = spawn_device(&rt, DeviceId::new("a"), Answer42, &actix::Arbiter::current(), None);
//!     spawned.device.realize_and_start().await.unwrap();
//!     let read = GuestAccess {
//!         region: DeviceRegion(0),
//!         offset: RegionOffset(0),
//!         size: AccessSize::B4,
//!         op: AccessOp::Read,
//!     };
//!     let reply = spawned.device.access(&ActorId::new("doc"), read).await;
//!     assert_eq!(reply, Ok(AccessReply::Read { value: 42 }));
//! });
//! ```

#![deny(missing_docs)]

pub mod addr;
pub mod device;
pub mod direct;
pub mod gate;
pub mod ids;
pub mod irq;
pub mod journal;
pub mod lifecycle;
pub mod recording;
pub mod send;
pub mod supervisor;

pub use addr::{AccessSize, BusAddr, InvalidAccessSize, RegionOffset};
pub use device::{
    spawn_device, AccessOp, AccessReply, Completion, Deliver, Device, DeviceActor, DeviceRef,
    DeviceRegion, DeviceStatus, Drain, DrainError, DrainReport, GuestAccess, LaterReply,
    LifecycleError, PendingAccess, QueryStatus, Realize, SpawnedDevice, Start,
};
pub use direct::{Events, Here, Via};
pub use gate::{
    panic_message, DrainError as GateDrainError, DrainReport as GateDrainReport, Gate, Lanes,
    MessageKind, Pending, Ticket,
};
pub use ids::{ActorId, DeviceId, Seq};
pub use irq::{IrqLevel, IrqLine, IrqNumber};
pub use journal::{Journal, JournalRecord, MemoryJournal, Recordable, Replied, Sent};
pub use lifecycle::{InvalidTransition, State};
pub use send::{Answer, Envelope, Refused, Reply, Request, Responder, Runtime, Sender};
pub use supervisor::{DeviceFailed, QueryFailures, Supervisor};
