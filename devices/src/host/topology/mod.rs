// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Topologies: the JSON file that lists a VM's buses and devices, its Rust
//! types, and the checks that run on it before anything starts.
//!
//! `switchboard check FILE` runs [`check_file`]; a later `run` command starts
//! what a checked [`Topology`] describes, and a control socket's `device-add`
//! checks one device object with [`parse_device`] and
//! [`check_device_against`]. The Rust types here are the source of truth: the
//! JSON Schema in `examples/topology.schema.json` is generated from them
//! ([`schema_json`]), and a unit test fails when it is out of date.
//!
//! # The format
//!
//! ```json
//! {
//!   "buses":   [ { "id": "pio0", "kind": "pio" } ],
//!   "devices": [
//!     { "id": "disk0", "kind": "virtio-blk", "path": "disk.img", "read_only": false,
//!       "vhost_user": { "socket": "/run/switchboard/disk0.sock", "queues": 2 } },
//!     { "id": "rng0",  "kind": "virtio-rng", "vhost_user": { "socket": "/run/switchboard/rng0.sock" } },
//!     { "id": "com1",  "kind": "uart-16550", "bus": "pio0", "addr": "0x3f8", "output": "stdout" }
//!   ]
//! }
//! ```
//!
//! - `buses` (may be left out: no buses): each `{ "id", "kind", "size" }`.
//!   `kind` is `"pio"` (port I/O, 64 KiB) or `"mmio"` (the whole 64-bit
//!   space). `size`, optional, makes the bus smaller; a PIO bus is at most
//!   64 KiB.
//! - `devices`: objects told apart by `kind`, one of the
//!   [`DeviceKind`]s (each named by its model's `KIND`):
//!
//! | `kind` | fields (`?`: optional, with its default) |
//! |---|---|
//! | `virtio-blk` | `id`, `path` (a raw image), `read_only?` (false), `serial?` (the image's file name; at most 20 bytes), `vhost_user` |
//! | `virtio-rng` | `id`, `rate_limit?` (bytes per second; no limit), `vhost_user` |
//! | `uart-16550` | `id`, `bus`, `addr` (an 8-byte register region), `output` |
//! | `test-device` | `id`, `bus`, `addr` (a 32-byte region), `read_delay_us?` (0) |
//! | `virtio-fault` | `id`, `panic_after?` (0), `hold?` (0), `panic_in?` (`"handle"`), `fail_status?` (none), `vhost_user` |
//!
//! - `vhost_user` is `{ "socket", "queues?", "restart?" }`: the unix socket
//!   the device is served on, its number of virtqueues (default 1; 1 to 64
//!   for virtio-blk, exactly 1 for virtio-rng and virtio-fault), and what is
//!   done when it fails ([`RestartPolicy`]): `"never"` (the default: it
//!   stays stopped with its failure) or `{ "limit", "backoff_ms?" (100),
//!   "max_backoff_ms?" (5000) }`: restarted as a fresh device on the same
//!   socket at most `limit` (at least 1) times in the run, each after a
//!   backoff of `backoff_ms` doubled per restart before it, at most
//!   `max_backoff_ms` (at least `backoff_ms`, at most an hour); see
//!   [`crate::host::restart`].
//! - `virtio-fault` is a **fault-injection device for testing** panic
//!   containment ([`crate::models::fault`]): an entropy device that answers the
//!   first `panic_after` requests, except that it keeps the last `hold` of
//!   them (at most `panic_after`, at most 255) unanswered, and panics on the
//!   next one, in `handle` on the queue worker (`panic_in: "handle"`) or on
//!   a thread of its own (`"io-thread"`). The requests it holds then are
//!   answered with `fail_status` (0 to 255) in their last writable byte, or
//!   with nothing written when it is left out. Never put one in a real VM.
//! - `output` (a UART's character backend) is one of the strings `"stdout"`,
//!   `"stdio"` (stdout, and input from stdin), `"null"`, `"file:PATH"`
//!   (appended to, created if missing) or `"unix:PATH"` (a socket the UART
//!   listens on); see [`Output`].
//! - Numbers (`addr`, `size`, `queues`, `rate_limit`, `read_delay_us`,
//!   `panic_after`, `hold`, `fail_status`, and `restart`'s) are JSON
//!   numbers or strings of decimal digits or of `0x` and hex digits
//!   (`"0x3f8"`, `"1016"`).
//! - Unknown fields are errors, and so is a key given twice in one object.
//!
//! # Ids
//!
//! An id is 1 to 64 ASCII letters, digits, `-`, `_` or `.`, starting with a
//! letter or a digit. Buses and devices share one namespace: an id names one
//! thing, whatever the context (logs, the control socket, error messages).
//!
//! # Relative paths
//!
//! Relative paths (`path`, `vhost_user.socket`, and the path of a `file:` or
//! `unix:` output) are resolved against the directory of the topology file,
//! not the working directory, so a topology can travel with its images. The
//! [`Topology`] that [`check_file`] returns holds the resolved paths.
//!
//! # Checking
//!
//! [`check_str`] reports every error it can find, each as a [`Diagnostic`]
//! with the JSON path of the value at fault (`devices[2].vhost_user.socket`),
//! its line and column in the text, and what was expected:
//!
//! 1. JSON syntax (one error: nothing after it can be read);
//! 2. the shape of each bus and device: types, unknown and missing fields,
//!    malformed numbers. Each bus and device is read on its own, and after an
//!    error the value at fault is set aside and the object read again, so
//!    independent errors in one object are all reported;
//! 3. the meaning ([`validate`]): duplicate ids, unknown buses, regions that
//!    overlap or leave their bus, images that are missing, not regular files,
//!    smaller than a sector or that cannot be opened as asked, socket paths
//!    that exist and are not sockets (or are in use), or whose directory is
//!    missing, two devices on one socket or output file, two devices on one
//!    image unless both are read-only, queue counts out of range, serials
//!    over 20 bytes, a rate limit of 0, a fault device holding more
//!    requests than come before its panic, and a restart limit of 0 or a
//!    backoff out of range.
//!
//! The checks of one device's values (queue counts, serials, rate limits,
//! fault schedules) are its spec's [`KindSpec::validate`], with a
//! `check_*` function per value ([`BlkSpec::check_queues`], ...), so that a
//! command line that builds a spec checks it the same way.
//!
//! The file-system checks inspect and open files but never create, write or
//! remove anything.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, DeserializeOwned, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use switchboard_runtime::{BusAddr, DeviceId};

use crate::error_chain;
pub use crate::models::blk::MAX_QUEUES;
use crate::models::blk::{BlkOptions, ID_LEN, SECTOR_SIZE};
use crate::models::fault::{FaultConfig, PanicIn, MAX_HOLD};
use crate::models::serial::SERIAL_REGION_SIZE;
use crate::models::slow::{SlowDeviceConfig, SLOW_REGION_SIZE};
use crate::models::uart_sink::Sink;
use crate::models::DeviceKind;
use crate::vhost_user::{self, check_socket_path};

/// Size of the x86 port I/O space, and so of a PIO bus.
pub const PIO_SPACE_SIZE: u64 = 0x1_0000;

/// The device kinds, as written in `kind` ([`DeviceKind::NAMES`]).
pub const KINDS: [&str; 5] = DeviceKind::NAMES;

/// Longest id.
const MAX_ID_LEN: usize = 64;

/// Longest unix socket path: `sun_path` holds 108 bytes, the last a NUL.
const MAX_SOCKET_PATH: usize = 107;

/// What a topology check returns: the value, or every error found.
pub type Result<T> = std::result::Result<T, Vec<Diagnostic>>;

mod check;
mod diagnostic;
mod parse;
mod restart;
mod scan;
mod spec;
#[cfg(test)]
mod tests;
mod value;

pub use check::*;
pub use diagnostic::*;
pub use parse::*;
pub use restart::*;
use scan::*;
pub use spec::*;
pub use value::*;
