// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device models: what a guest talks to.
//!
//! - [`serial`]: a 16550A UART for Linux's 8250 driver as a device actor;
//!   [`uart`] is its register model and [`uart_sink`] its character backends
//!   (stdout, a file, a unix socket).
//! - [`slow`]: the test device, whose reads take a configurable time, for
//!   drain tests.
//! - [`virtio`]: the interface a virtio device implements ([`virtio::VirtioDevice`])
//!   and the [`virtio::Request`] it is handed; [`blk`] and [`rng`] implement it,
//!   and so does [`fault`], a fault-injection test device that panics on a
//!   chosen request.
//!
//! - [`kind`]: the registry of device kinds ([`DeviceKind`]), each named by
//!   its model's `KIND`.
//!
//! Models depend on `switchboard-runtime` and `switchboard-bus` only, never
//! on the serving layer ([`crate::vhost_user`]), the host ([`crate::host`]) or
//! the log tools ([`crate::log`]).

pub mod blk;
pub mod fault;
pub mod kind;
pub mod rng;
pub mod serial;
pub mod slow;
pub mod uart;
pub mod uart_sink;
pub mod virtio;

pub use kind::{DeviceKind, UnknownKind};
