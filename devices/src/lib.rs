// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device actors for switchboard, and what serves and hosts them.
//!
//! The crate is split by role; each folder is one module:
//!
//! - [`models`]: the device models (UART, test device, virtio-blk,
//!   virtio-rng, virtio-fault), each implementing
//!   [`switchboard_runtime::Device`] or [`models::virtio::VirtioDevice`];
//! - [`vhost_user`]: the serving layer that hands virtio devices to a VMM
//!   over vhost-user;
//! - [`host`]: the topology format, the fleet of running devices, the
//!   control socket and the runner;
//! - [`log`]: replay and inspection of message logs.
//!
//! Buses from `switchboard-bus` route guest accesses to the MMIO/PIO devices.
//! The `switchboard` command line lives in its own crate (`devices/cli`), so
//! this library depends on no CLI crate.

#![deny(missing_docs)]

pub mod host;
pub mod log;
pub mod models;
pub mod vhost_user;

pub use models::serial::{spawn_serial, Serial, SerialEvent};
pub use models::slow::{SlowDevice, SlowDeviceConfig, SlowDeviceProbe};

/// An error and its sources, joined with `": "`: the one-line form used in
/// logs, CLI messages and control replies.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
