// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device actors for switchboard.
//!
//! - [`uart`]: a 16550A UART for Linux's 8250 driver, with its output and
//!   input on a character backend (stdout, a file, a unix socket).
//! - [`slow`]: a test device whose reads take a configurable time, for drain
//!   tests.
//!
//! Each device implements [`switchboard_runtime::Device`] and is hosted by a
//! device actor; buses from `switchboard-bus` route guest accesses to it.

#![deny(missing_docs)]

pub mod slow;
pub mod uart;
pub mod uart_sink;

pub use slow::{SlowDevice, SlowDeviceConfig, SlowDeviceProbe};
