// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device actors for switchboard.
//!
//! - [`serial`]: a 16550A UART for Linux's 8250 driver as a device actor;
//!   [`uart`] is its register model and [`uart_sink`] its character backends
//!   (stdout, a file, a unix socket).
//! - [`blk`] and [`rng`]: virtio-blk and virtio-rng, served over
//!   vhost-user by [`vhost_user`], which waits for frontends with `listen`
//!   (a wait a stop always ends, and a socket file removed only while it is
//!   still the server's).
//! - [`slow`]: a test device whose reads take a configurable time, for drain
//!   tests.
//! - [`fault`]: virtio-fault, a fault-injection test device served over
//!   vhost-user that panics on a chosen request, for panic-containment tests.
//!
//! Each device implements [`switchboard_runtime::Device`] and is hosted by a
//! device actor; buses from `switchboard-bus` route guest accesses to it.

#![deny(missing_docs)]

pub mod blk;
pub mod control;
pub mod fault;
pub mod fleet;
pub mod inspect;
mod listen;
pub mod replay;
pub mod rng;
pub mod runner;
pub mod serial;
pub mod slow;
pub mod topology;
pub mod uart;
pub mod uart_sink;
pub mod vhost_user;
pub mod virtio;

pub use serial::{spawn_serial, Serial, SerialEvent};
pub use slow::{SlowDevice, SlowDeviceConfig, SlowDeviceProbe};

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
