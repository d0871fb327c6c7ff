// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host: what runs a set of devices as one process.
//!
//! - [`topology`]: the JSON topology format, its schema and its checker;
//! - [`fleet`]: the running devices, added and removed at run time;
//! - [`restart`]: a failed vhost-user device served again, fresh, on its
//!   socket, as its restart policy says;
//! - [`control`]: the control socket's line protocol;
//! - [`runner`]: a checked topology's devices started in one fleet (what
//!   `switchboard run` and `switchboard serve` both start), and the
//!   control commands on them.
//!
//! The host depends on the models ([`crate::models`]) and the serving layer
//! ([`crate::vhost_user`]).

pub mod control;
pub mod fleet;
pub mod restart;
pub mod runner;
pub mod topology;
