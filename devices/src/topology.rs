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
//! - `devices`: objects told apart by `kind`:
//!
//! | `kind` | fields (`?`: optional, with its default) |
//! |---|---|
//! | `virtio-blk` | `id`, `path` (a raw image), `read_only?` (false), `serial?` (the image's file name; at most 20 bytes), `vhost_user` |
//! | `virtio-rng` | `id`, `rate_limit?` (bytes per second; no limit), `vhost_user` |
//! | `uart-16550` | `id`, `bus`, `addr` (an 8-byte register region), `output` |
//! | `test-device` | `id`, `bus`, `addr` (a 32-byte region), `read_delay_us?` (0) |
//! | `virtio-fault` | `id`, `panic_after?` (0), `hold?` (0), `panic_in?` (`"handle"`), `fail_status?` (none), `vhost_user` |
//!
//! - `vhost_user` is `{ "socket", "queues?" }`: the unix socket the device is
//!   served on, and its number of virtqueues (default 1; 1 to 64 for
//!   virtio-blk, exactly 1 for virtio-rng and virtio-fault).
//! - `virtio-fault` is a **fault-injection device for testing** panic
//!   containment ([`crate::fault`]): an entropy device that answers the
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
//!   `panic_after`, `hold`, `fail_status`) are JSON
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
//!    over 20 bytes, a rate limit of 0 and a fault device holding more
//!    requests than come before its panic.
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

use crate::blk::{BlkOptions, ID_LEN, SECTOR_SIZE};
use crate::error_chain;
use crate::fault::{FaultConfig, PanicIn, MAX_HOLD};
use crate::serial::SERIAL_REGION_SIZE;
use crate::slow::{SlowDeviceConfig, SLOW_REGION_SIZE};
use crate::uart_sink::Sink;
use crate::vhost_user::{self, check_socket_path};

/// Most virtqueues a virtio-blk device may have (as `switchboard serve blk
/// --queues`).
pub const MAX_QUEUES: u16 = 64;

/// Size of the x86 port I/O space, and so of a PIO bus.
pub const PIO_SPACE_SIZE: u64 = 0x1_0000;

/// The device kinds, as written in `kind`.
pub const KINDS: [&str; 5] = [
    "virtio-blk",
    "virtio-rng",
    "uart-16550",
    "test-device",
    "virtio-fault",
];

/// Longest id.
const MAX_ID_LEN: usize = 64;

/// Longest unix socket path: `sun_path` holds 108 bytes, the last a NUL.
const MAX_SOCKET_PATH: usize = 107;

/// What a topology check returns: the value, or every error found.
pub type Result<T> = std::result::Result<T, Vec<Diagnostic>>;

// ---------------------------------------------------------------------------
// Ids and numbers
// ---------------------------------------------------------------------------

const ID_EXPECTED: &str =
    "an id: 1 to 64 ASCII letters, digits, '-', '_' or '.', starting with a letter or digit";

fn valid_id(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && s.len() <= MAX_ID_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

struct IdVisitor;

impl Visitor<'_> for IdVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(ID_EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<String, E> {
        if valid_id(v) {
            Ok(v.to_owned())
        } else {
            Err(E::invalid_value(Unexpected::Str(v), &self))
        }
    }
}

fn deserialize_device_id<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<DeviceId, D::Error> {
    d.deserialize_str(IdVisitor).map(DeviceId::new)
}

fn id_schema() -> Schema {
    json_schema!({
        "type": "string",
        "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
    })
}

/// The schema of a device id (the runtime's [`DeviceId`] knows no schemas).
struct IdSchema;

impl JsonSchema for IdSchema {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Id".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        id_schema()
    }
}

/// The id of a bus in a topology (`pio0`, `mmio0`). Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct BusId(Arc<str>);

impl BusId {
    /// A bus id from its name.
    pub fn new(name: impl AsRef<str>) -> Self {
        BusId(Arc::from(name.as_ref()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BusId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for BusId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_str(IdVisitor).map(BusId::new)
    }
}

impl JsonSchema for BusId {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "BusId".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        id_schema()
    }
}

/// An unsigned integer type a topology number can be read into.
trait Unsigned: Copy + TryFrom<u64> + Into<u64> {
    const MAX: u64;
    const EXPECTED: &'static str;
}

impl Unsigned for u8 {
    const MAX: u64 = u8::MAX as u64;
    const EXPECTED: &'static str = "an integer from 0 to 255 (a JSON number, \
        or a string of decimal digits or of 0x and hex digits)";
}

impl Unsigned for u16 {
    const MAX: u64 = u16::MAX as u64;
    const EXPECTED: &'static str = "an integer from 0 to 65535 (a JSON number, \
        or a string of decimal digits or of 0x and hex digits)";
}

impl Unsigned for u64 {
    const MAX: u64 = u64::MAX;
    const EXPECTED: &'static str = "an integer from 0 to 2^64-1 (a JSON number, \
        or a string of decimal digits or of 0x and hex digits)";
}

/// A number written as a JSON number or as a decimal or `0x` hex string.
struct Num<T>(T);

struct NumVisitor<T>(PhantomData<T>);

/// Reads `1016` or `0x3f8`; nothing else (no sign, no spaces, no `_`).
fn parse_unsigned(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        None => None,
    }
}

impl<T: Unsigned> Visitor<'_> for NumVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTED)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<T, E> {
        T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<T, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<T, E> {
        Err(E::invalid_type(Unexpected::Float(v), &self))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<T, E> {
        parse_unsigned(v)
            .and_then(|n| T::try_from(n).ok())
            .ok_or_else(|| E::invalid_value(Unexpected::Str(v), &self))
    }
}

impl<'de, T: Unsigned> Deserialize<'de> for Num<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(NumVisitor(PhantomData)).map(Num)
    }
}

impl<T: Unsigned> Serialize for Num<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u64(self.0.into())
    }
}

impl<T: Unsigned> JsonSchema for Num<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Number".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "anyOf": [
                { "type": "integer", "minimum": 0, "maximum": T::MAX },
                { "type": "string", "pattern": "^(0[xX][0-9a-fA-F]+|[0-9]+)$" }
            ]
        })
    }
}

fn deserialize_num<'de, D: Deserializer<'de>, T: Unsigned>(
    d: D,
) -> std::result::Result<T, D::Error> {
    Num::<T>::deserialize(d).map(|n| n.0)
}

fn deserialize_opt_num<'de, D: Deserializer<'de>, T: Unsigned>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    Option::<Num<T>>::deserialize(d).map(|n| n.map(|n| n.0))
}

fn deserialize_addr<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<BusAddr, D::Error> {
    deserialize_num::<D, u64>(d).map(BusAddr)
}

fn default_queues() -> u16 {
    1
}

// ---------------------------------------------------------------------------
// The types
// ---------------------------------------------------------------------------

/// A VM's buses and devices, as read from a topology file.
///
/// Read one with [`check_file`] or [`check_str`]: deserializing it directly
/// checks the shape only, and leaves relative paths as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "switchboard topology")]
pub struct Topology {
    /// The buses that devices with a register region sit on.
    #[serde(default)]
    pub buses: Vec<BusSpec>,
    /// The devices.
    pub devices: Vec<DeviceSpec>,
}

impl Topology {
    /// Checks what the types cannot express (see [`validate`]).
    pub fn validate(&self) -> Vec<Diagnostic> {
        validate(&self.buses, &self.devices)
    }
}

/// The kind of a bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// Port I/O: a 64 KiB space.
    Pio,
    /// Memory-mapped I/O: the whole 64-bit space.
    Mmio,
}

impl BusKind {
    /// The size of a bus of this kind when none is given, which is also the
    /// largest size.
    pub fn max_size(self) -> u128 {
        match self {
            BusKind::Pio => u128::from(PIO_SPACE_SIZE),
            BusKind::Mmio => 1 << 64,
        }
    }

    /// The name, as written in `kind`.
    pub fn name(self) -> &'static str {
        match self {
            BusKind::Pio => "pio",
            BusKind::Mmio => "mmio",
        }
    }
}

/// A bus: an address space that routes guest accesses to device regions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BusSpec {
    /// The bus's id.
    pub id: BusId,
    /// What kind of address space it is.
    pub kind: BusKind,
    /// The bus's size in bytes (default: the whole space of its kind; a PIO
    /// bus is at most 64 KiB).
    #[serde(
        default,
        deserialize_with = "deserialize_opt_num",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<Num<u64>>")]
    pub size: Option<u64>,
}

impl BusSpec {
    /// The bus's id.
    pub fn id(&self) -> &BusId {
        &self.id
    }

    /// The bus's size in bytes: `size`, or the whole space of its kind
    /// (2^64 for MMIO, hence `u128`).
    pub fn size(&self) -> u128 {
        self.size.map_or(self.kind.max_size(), u128::from)
    }
}

/// How a virtio device is served over vhost-user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VhostUserSpec {
    /// The unix socket the device listens on. It must not exist, or be a
    /// stale socket nobody listens on.
    pub socket: PathBuf,
    /// Number of virtqueues: 1 to 64 for virtio-blk, 1 for virtio-rng and
    /// virtio-fault.
    #[serde(default = "default_queues", deserialize_with = "deserialize_num")]
    #[schemars(with = "Num<u16>")]
    pub queues: u16,
}

/// A virtio-blk disk on a raw image, served over vhost-user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlkSpec {
    /// The device's id.
    #[serde(deserialize_with = "deserialize_device_id")]
    #[schemars(with = "IdSchema")]
    pub id: DeviceId,
    /// The raw image file (at least one 512-byte sector).
    pub path: PathBuf,
    /// Serve the image read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The disk's serial number (GET_ID), at most 20 bytes (default: the
    /// image's file name, cut to 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The vhost-user endpoint.
    pub vhost_user: VhostUserSpec,
}

impl BlkSpec {
    /// The device's id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// The options to open the image with ([`crate::blk::Blk::open`]).
    pub fn blk_options(&self) -> BlkOptions {
        BlkOptions {
            read_only: self.read_only,
            queues: self.vhost_user.queues,
            serial: self.serial.clone(),
            ..BlkOptions::default()
        }
    }
}

/// A virtio-rng entropy source, served over vhost-user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RngSpec {
    /// The device's id.
    #[serde(deserialize_with = "deserialize_device_id")]
    #[schemars(with = "IdSchema")]
    pub id: DeviceId,
    /// Most bytes per second handed to the guest (default: no limit).
    #[serde(
        default,
        deserialize_with = "deserialize_opt_num",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<Num<u64>>")]
    pub rate_limit: Option<u64>,
    /// The vhost-user endpoint.
    pub vhost_user: VhostUserSpec,
}

impl RngSpec {
    /// The device's id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }
}

/// The fault-injection test device ([`crate::fault::FaultDevice`]): an
/// entropy device that panics on a chosen request, served over vhost-user.
/// For testing panic containment only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// The device's id.
    #[serde(deserialize_with = "deserialize_device_id")]
    #[schemars(with = "IdSchema")]
    pub id: DeviceId,
    /// Requests before the one that panics (default 0: the first request
    /// panics).
    #[serde(default, deserialize_with = "deserialize_num")]
    #[schemars(with = "Num<u64>")]
    pub panic_after: u64,
    /// How many of the requests before the panic (the last ones) are kept
    /// unanswered until it: at most `panic_after` and at most 255 (default
    /// 0).
    #[serde(default, deserialize_with = "deserialize_num")]
    #[schemars(with = "Num<u16>")]
    pub hold: u16,
    /// Where the panic happens: `"handle"` (on the queue worker, the
    /// default) or `"io-thread"` (on the device's own thread).
    #[serde(default)]
    pub panic_in: PanicIn,
    /// The status byte written into the last writable byte of each request
    /// answered because of the panic (default: nothing is written).
    #[serde(
        default,
        deserialize_with = "deserialize_opt_num",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<Num<u8>>")]
    pub fail_status: Option<u8>,
    /// The vhost-user endpoint.
    pub vhost_user: VhostUserSpec,
}

impl FaultSpec {
    /// The device's id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// The device's configuration.
    pub fn config(&self) -> FaultConfig {
        FaultConfig {
            panic_after: self.panic_after,
            hold: self.hold,
            panic_in: self.panic_in,
            fail_status: self.fail_status,
        }
    }
}

/// Where a UART's characters go: `"stdout"`, `"stdio"`, `"null"`,
/// `"file:PATH"` or `"unix:PATH"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// `"null"`: output is discarded; there is no input.
    Null,
    /// `"stdout"`: output goes to stdout; there is no input.
    Stdout,
    /// `"stdio"`: output goes to stdout, input comes from stdin.
    Stdio,
    /// `"file:PATH"`: output is appended to the file, created if missing.
    File(PathBuf),
    /// `"unix:PATH"`: the UART listens on a unix socket; its client gets the
    /// output and sends the input.
    Unix(PathBuf),
}

const OUTPUT_EXPECTED: &str =
    "an output: \"stdout\", \"stdio\", \"null\", \"file:PATH\" or \"unix:PATH\"";

impl Output {
    fn parse(s: &str) -> Option<Output> {
        match s {
            "null" => Some(Output::Null),
            "stdout" => Some(Output::Stdout),
            "stdio" => Some(Output::Stdio),
            _ => {
                if let Some(p) = s.strip_prefix("file:").filter(|p| !p.is_empty()) {
                    Some(Output::File(PathBuf::from(p)))
                } else {
                    s.strip_prefix("unix:")
                        .filter(|p| !p.is_empty())
                        .map(|p| Output::Unix(PathBuf::from(p)))
                }
            }
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Output::Null => f.write_str("null"),
            Output::Stdout => f.write_str("stdout"),
            Output::Stdio => f.write_str("stdio"),
            Output::File(p) => write!(f, "file:{}", p.display()),
            Output::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl From<&Output> for Sink {
    fn from(output: &Output) -> Sink {
        match output {
            Output::Null => Sink::Null,
            Output::Stdout => Sink::Stdout,
            Output::Stdio => Sink::Stdio,
            Output::File(p) => Sink::File(p.clone()),
            Output::Unix(p) => Sink::UnixSocket(p.clone()),
        }
    }
}

struct OutputVisitor;

impl Visitor<'_> for OutputVisitor {
    type Value = Output;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(OUTPUT_EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Output, E> {
        Output::parse(v).ok_or_else(|| E::invalid_value(Unexpected::Str(v), &self))
    }
}

impl<'de> Deserialize<'de> for Output {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_str(OutputVisitor)
    }
}

impl Serialize for Output {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Output {
    fn schema_name() -> Cow<'static, str> {
        "Output".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Where a UART's characters go: \"stdout\", \"stdio\" (stdout, and \
                input from stdin), \"null\", \"file:PATH\" (appended to) or \"unix:PATH\" \
                (a socket the UART listens on).",
            "anyOf": [
                { "enum": ["stdout", "stdio", "null"] },
                { "type": "string", "pattern": "^(file|unix):.+$" }
            ]
        })
    }
}

/// A 16550A UART with an 8-byte register region on a bus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UartSpec {
    /// The device's id.
    #[serde(deserialize_with = "deserialize_device_id")]
    #[schemars(with = "IdSchema")]
    pub id: DeviceId,
    /// The bus the registers sit on.
    pub bus: BusId,
    /// The address of the registers on the bus (0x3f8 for COM1).
    #[serde(deserialize_with = "deserialize_addr")]
    #[schemars(with = "Num<u64>")]
    pub addr: BusAddr,
    /// Where the characters go.
    pub output: Output,
}

impl UartSpec {
    /// The device's id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }
}

/// The slow test device ([`crate::SlowDevice`]) with a 32-byte register
/// region on a bus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestDeviceSpec {
    /// The device's id.
    #[serde(deserialize_with = "deserialize_device_id")]
    #[schemars(with = "IdSchema")]
    pub id: DeviceId,
    /// The bus the registers sit on.
    pub bus: BusId,
    /// The address of the registers on the bus.
    #[serde(deserialize_with = "deserialize_addr")]
    #[schemars(with = "Num<u64>")]
    pub addr: BusAddr,
    /// How long each read takes to answer, in microseconds.
    #[serde(default, deserialize_with = "deserialize_num")]
    #[schemars(with = "Num<u64>")]
    pub read_delay_us: u64,
}

impl TestDeviceSpec {
    /// The device's id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// The device's configuration.
    pub fn config(&self) -> SlowDeviceConfig {
        SlowDeviceConfig {
            read_delay: Duration::from_micros(self.read_delay_us),
            record: false,
        }
    }
}

/// One device of a topology, told apart by `kind`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind")]
pub enum DeviceSpec {
    /// A virtio-blk disk on a raw image, served over vhost-user.
    #[serde(rename = "virtio-blk")]
    VirtioBlk(BlkSpec),
    /// A virtio-rng entropy source, served over vhost-user.
    #[serde(rename = "virtio-rng")]
    VirtioRng(RngSpec),
    /// A 16550A UART with an 8-byte register region on a bus.
    #[serde(rename = "uart-16550")]
    Uart16550(UartSpec),
    /// The slow test device, with a 32-byte register region on a bus.
    #[serde(rename = "test-device")]
    TestDevice(TestDeviceSpec),
    /// The fault-injection test device (an entropy device that panics on a
    /// chosen request), served over vhost-user. For testing only.
    #[serde(rename = "virtio-fault")]
    VirtioFault(FaultSpec),
}

/// Where a device with a register region sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement<'a> {
    /// The bus.
    pub bus: &'a BusId,
    /// The region's first address.
    pub addr: BusAddr,
    /// The region's size in bytes.
    pub size: u64,
}

impl Placement<'_> {
    fn end(&self) -> u128 {
        u128::from(self.addr.0) + u128::from(self.size)
    }
}

impl DeviceSpec {
    /// The device's id.
    pub fn id(&self) -> &DeviceId {
        match self {
            DeviceSpec::VirtioBlk(d) => &d.id,
            DeviceSpec::VirtioRng(d) => &d.id,
            DeviceSpec::Uart16550(d) => &d.id,
            DeviceSpec::TestDevice(d) => &d.id,
            DeviceSpec::VirtioFault(d) => &d.id,
        }
    }

    /// The kind, as written in `kind` (`virtio-blk`).
    pub fn kind_name(&self) -> &'static str {
        match self {
            DeviceSpec::VirtioBlk(_) => KINDS[0],
            DeviceSpec::VirtioRng(_) => KINDS[1],
            DeviceSpec::Uart16550(_) => KINDS[2],
            DeviceSpec::TestDevice(_) => KINDS[3],
            DeviceSpec::VirtioFault(_) => KINDS[4],
        }
    }

    /// The vhost-user endpoint of a virtio device; `None` for a bus device.
    pub fn vhost_user(&self) -> Option<&VhostUserSpec> {
        match self {
            DeviceSpec::VirtioBlk(d) => Some(&d.vhost_user),
            DeviceSpec::VirtioRng(d) => Some(&d.vhost_user),
            DeviceSpec::VirtioFault(d) => Some(&d.vhost_user),
            DeviceSpec::Uart16550(_) | DeviceSpec::TestDevice(_) => None,
        }
    }

    /// The register region of a bus device; `None` for a vhost-user device.
    pub fn placement(&self) -> Option<Placement<'_>> {
        match self {
            DeviceSpec::Uart16550(d) => Some(Placement {
                bus: &d.bus,
                addr: d.addr,
                size: SERIAL_REGION_SIZE,
            }),
            DeviceSpec::TestDevice(d) => Some(Placement {
                bus: &d.bus,
                addr: d.addr,
                size: SLOW_REGION_SIZE,
            }),
            DeviceSpec::VirtioBlk(_) | DeviceSpec::VirtioRng(_) | DeviceSpec::VirtioFault(_) => {
                None
            }
        }
    }

    /// Makes relative paths relative to `base_dir`.
    fn resolve_paths(&mut self, base_dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base_dir.join(&*p);
            }
        };
        match self {
            DeviceSpec::VirtioBlk(d) => {
                resolve(&mut d.path);
                resolve(&mut d.vhost_user.socket);
            }
            DeviceSpec::VirtioRng(d) => resolve(&mut d.vhost_user.socket),
            DeviceSpec::VirtioFault(d) => resolve(&mut d.vhost_user.socket),
            DeviceSpec::Uart16550(d) => match &mut d.output {
                Output::File(p) | Output::Unix(p) => resolve(p),
                Output::Null | Output::Stdout | Output::Stdio => {}
            },
            DeviceSpec::TestDevice(_) => {}
        }
    }
}

/// The JSON Schema of a topology file, generated from [`Topology`].
pub fn schema() -> Schema {
    schemars::schema_for!(Topology)
}

/// [`schema`] as pretty-printed JSON with a final newline: the contents of
/// `examples/topology.schema.json`.
pub fn schema_json() -> String {
    let mut text =
        serde_json::to_string_pretty(&schema()).expect("a JSON Schema is plain JSON data");
    text.push('\n');
    text
}

// ---------------------------------------------------------------------------
// Diagnostics and JSON paths
// ---------------------------------------------------------------------------

/// One error in a topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The JSON path of the value at fault, such as
    /// `devices[2].vhost_user.socket`; empty for the whole document.
    pub path: String,
    /// The line of the value at fault (from 1), when the text is known.
    pub line: Option<usize>,
    /// The column of the value at fault (from 1, in characters), when the
    /// text is known.
    pub column: Option<usize>,
    /// What is wrong, and what was expected.
    pub message: String,
}

impl Diagnostic {
    /// The diagnostic prefixed with the file it is about:
    /// `FILE:LINE:COLUMN: PATH: MESSAGE`.
    pub fn in_file<'a>(&'a self, file: &'a Path) -> impl fmt::Display + 'a {
        InFile { diag: self, file }
    }
}

impl fmt::Display for Diagnostic {
    /// `LINE:COLUMN: PATH: MESSAGE`, leaving out what is unknown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{l}:{c}: ")?,
            (Some(l), None) => write!(f, "{l}: ")?,
            _ => {}
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Diagnostic {}

struct InFile<'a> {
    diag: &'a Diagnostic,
    file: &'a Path,
}

impl fmt::Display for InFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if self.diag.line.is_some() { ":" } else { ": " };
        write!(f, "{}{sep}{}", self.file.display(), self.diag)
    }
}

/// One step of a JSON path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A JSON path such as `devices[2].vhost_user.socket`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct JsonPath(Vec<Seg>);

impl JsonPath {
    fn key(&self, key: &str) -> JsonPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(key.to_owned()));
        p
    }

    fn index(&self, i: usize) -> JsonPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    fn join(&self, other: &JsonPath) -> JsonPath {
        let mut p = self.clone();
        p.0.extend(other.0.iter().cloned());
        p
    }

    /// Reads what `Display` writes; stops at anything it does not
    /// understand.
    fn parse(s: &str) -> JsonPath {
        let mut segs = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix('[') {
                if r.starts_with('"') {
                    let mut keys = serde_json::Deserializer::from_str(r).into_iter::<String>();
                    let Some(Ok(key)) = keys.next() else { break };
                    let Some(after) = r
                        .get(keys.byte_offset()..)
                        .and_then(|a| a.strip_prefix(']'))
                    else {
                        break;
                    };
                    segs.push(Seg::Key(key));
                    rest = after;
                } else {
                    let Some(end) = r.find(']') else { break };
                    let Ok(i) = r[..end].parse() else { break };
                    segs.push(Seg::Index(i));
                    rest = &r[end + 1..];
                }
            } else {
                let r = rest.strip_prefix('.').unwrap_or(rest);
                let end = r.find(['.', '[']).unwrap_or(r.len());
                if end == 0 {
                    break;
                }
                segs.push(Seg::Key(r[..end].to_owned()));
                rest = &r[end..];
            }
        }
        JsonPath(segs)
    }

    fn from_serde(path: &serde_path_to_error::Path) -> JsonPath {
        use serde_path_to_error::Segment;
        JsonPath(
            path.iter()
                .filter_map(|s| match s {
                    Segment::Seq { index } => Some(Seg::Index(*index)),
                    Segment::Map { key } => Some(Seg::Key(key.clone())),
                    Segment::Enum { .. } | Segment::Unknown => None,
                })
                .collect(),
        )
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key(k)
                    if !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
                {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Key(k) => {
                    let quoted = serde_json::to_string(k).map_err(|_| fmt::Error)?;
                    write!(f, "[{quoted}]")?;
                }
            }
        }
        Ok(())
    }
}

/// Which part of the text a finding points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Anchor {
    /// The value at the path.
    Value,
    /// The key of the value at the path (for an unknown field).
    Key,
    /// This byte offset.
    Offset(usize),
}

/// An error, before its path is located in the text.
#[derive(Clone, Debug)]
struct Finding {
    path: JsonPath,
    anchor: Anchor,
    message: String,
}

impl Finding {
    fn at(path: JsonPath, message: impl Into<String>) -> Finding {
        Finding {
            path,
            anchor: Anchor::Value,
            message: message.into(),
        }
    }

    fn at_key(path: JsonPath, message: impl Into<String>) -> Finding {
        Finding {
            path,
            anchor: Anchor::Key,
            message: message.into(),
        }
    }
}

/// Turns findings into diagnostics, with lines and columns when the text is
/// known, sorted by position.
fn diagnostics(findings: Vec<Finding>, source: Option<&SourceMap<'_>>) -> Vec<Diagnostic> {
    let mut out: Vec<Diagnostic> = findings
        .into_iter()
        .map(|f| {
            let pos = source.and_then(|s| s.line_col(s.locate(&f.path, f.anchor)?));
            Diagnostic {
                path: f.path.to_string(),
                line: pos.map(|p| p.0),
                column: pos.map(|p| p.1),
                message: f.message,
            }
        })
        .collect();
    out.sort_by_key(|d| (d.line.unwrap_or(usize::MAX), d.column.unwrap_or(0)));
    out
}

/// What a JSON value is, for messages: `a string "x"`, `an array`.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) => format!("number `{n}`"),
        Value::String(s) => format!("string {}", Value::String(s.clone())),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn kinds_list() -> String {
    KINDS
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// Where values are in the text
// ---------------------------------------------------------------------------

/// A JSON value's place in the text.
#[derive(Debug)]
struct Node {
    pos: usize,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Scalar,
    Array(Vec<Node>),
    Object(Vec<Member>),
}

#[derive(Debug)]
struct Member {
    key: String,
    key_pos: usize,
    value: Node,
}

/// A small, lenient JSON scanner that records where each value starts.
///
/// serde_json checks the syntax; this only finds positions, so it accepts
/// anything that looks like a scalar. With `stop_at` it stops at that offset
/// and remembers the path it was in, which names the place of a syntax
/// error.
struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    stop_at: usize,
    /// The path to the value being scanned.
    stack: Vec<Seg>,
    /// The path where scanning stopped, if it stopped early.
    stopped: Option<Vec<Seg>>,
    /// Keys given twice in one object: the path and the second key's offset.
    duplicates: Vec<(JsonPath, usize)>,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str, stop_at: usize) -> Self {
        Scanner {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            stop_at,
            stack: Vec::new(),
            stopped: None,
            duplicates: Vec::new(),
        }
    }

    fn skip_ws(&mut self) {
        while matches!(self.bytes.get(self.pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// Skips white space and says whether scanning ends here: at `stop_at`
    /// or at the end of the text. Otherwise `self.bytes[self.pos]` exists.
    fn halt(&mut self) -> bool {
        self.skip_ws();
        if self.pos >= self.stop_at || self.pos >= self.bytes.len() {
            self.fail::<()>();
            return true;
        }
        false
    }

    fn fail<T>(&mut self) -> Option<T> {
        if self.stopped.is_none() {
            self.stopped = Some(self.stack.clone());
        }
        None
    }

    fn value(&mut self) -> Option<Node> {
        if self.halt() {
            return None;
        }
        let pos = self.pos;
        match self.bytes[pos] {
            b'{' => self.object(pos),
            b'[' => self.array(pos),
            b'"' => {
                self.string()?;
                Some(Node {
                    pos,
                    body: Body::Scalar,
                })
            }
            _ => {
                while let Some(b) = self.bytes.get(self.pos) {
                    if b",:]}[{\" \t\r\n".contains(b) {
                        break;
                    }
                    self.pos += 1;
                }
                if self.pos == pos {
                    return self.fail();
                }
                Some(Node {
                    pos,
                    body: Body::Scalar,
                })
            }
        }
    }

    /// Scans a string at `self.pos` and returns its value.
    fn string(&mut self) -> Option<String> {
        let start = self.pos;
        self.pos += 1;
        loop {
            match self.bytes.get(self.pos) {
                None => return self.fail(),
                Some(b'\\') => self.pos += 2,
                Some(b'"') => break,
                Some(_) => self.pos += 1,
            }
        }
        self.pos += 1;
        let raw = self.text.get(start..self.pos)?;
        Some(
            serde_json::from_str::<String>(raw)
                .unwrap_or_else(|_| raw.trim_matches('"').to_owned()),
        )
    }

    fn object(&mut self, pos: usize) -> Option<Node> {
        self.pos += 1;
        let mut members: Vec<Member> = Vec::new();
        if self.halt() {
            return None;
        }
        if self.bytes[self.pos] == b'}' {
            self.pos += 1;
            return Some(Node {
                pos,
                body: Body::Object(members),
            });
        }
        loop {
            if self.halt() {
                return None;
            }
            if self.bytes[self.pos] != b'"' {
                return self.fail();
            }
            let key_pos = self.pos;
            let key = self.string()?;
            if self.halt() {
                return None;
            }
            if self.bytes[self.pos] != b':' {
                return self.fail();
            }
            self.pos += 1;
            self.stack.push(Seg::Key(key.clone()));
            let value = self.value();
            self.stack.pop();
            let value = value?;
            if members.iter().any(|m| m.key == key) {
                self.duplicates
                    .push((JsonPath(self.stack.clone()).key(&key), key_pos));
            }
            members.push(Member {
                key,
                key_pos,
                value,
            });
            if self.halt() {
                return None;
            }
            match self.bytes[self.pos] {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Some(Node {
                        pos,
                        body: Body::Object(members),
                    });
                }
                _ => return self.fail(),
            }
        }
    }

    fn array(&mut self, pos: usize) -> Option<Node> {
        self.pos += 1;
        let mut items = Vec::new();
        if self.halt() {
            return None;
        }
        if self.bytes[self.pos] == b']' {
            self.pos += 1;
            return Some(Node {
                pos,
                body: Body::Array(items),
            });
        }
        loop {
            self.stack.push(Seg::Index(items.len()));
            let item = self.value();
            self.stack.pop();
            items.push(item?);
            if self.halt() {
                return None;
            }
            match self.bytes[self.pos] {
                b',' => self.pos += 1,
                b']' => {
                    self.pos += 1;
                    return Some(Node {
                        pos,
                        body: Body::Array(items),
                    });
                }
                _ => return self.fail(),
            }
        }
    }
}

/// Where the values of a (syntactically valid) JSON text are.
struct SourceMap<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
    root: Option<Node>,
    duplicates: Vec<(JsonPath, usize)>,
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

impl<'a> SourceMap<'a> {
    fn new(text: &'a str) -> Self {
        let mut scanner = Scanner::new(text, usize::MAX);
        let root = scanner.value();
        SourceMap {
            text,
            line_starts: line_starts(text),
            root,
            duplicates: scanner.duplicates,
        }
    }

    /// The offset of what `anchor` names at `path`, or of the deepest value
    /// on the way that exists.
    fn locate(&self, path: &JsonPath, anchor: Anchor) -> Option<usize> {
        if let Anchor::Offset(pos) = anchor {
            return Some(pos);
        }
        let mut node = self.root.as_ref()?;
        for (i, seg) in path.0.iter().enumerate() {
            let last = i + 1 == path.0.len();
            match (seg, &node.body) {
                (Seg::Key(k), Body::Object(members)) => {
                    // serde_json keeps the last of duplicate keys.
                    let Some(m) = members.iter().rev().find(|m| &m.key == k) else {
                        return Some(node.pos);
                    };
                    if last && anchor == Anchor::Key {
                        return Some(m.key_pos);
                    }
                    node = &m.value;
                }
                (Seg::Index(n), Body::Array(items)) => match items.get(*n) {
                    Some(item) => node = item,
                    None => return Some(node.pos),
                },
                _ => return Some(node.pos),
            }
        }
        Some(node.pos)
    }

    /// The line and column (from 1; the column in characters) of an offset.
    fn line_col(&self, pos: usize) -> Option<(usize, usize)> {
        let line = self.line_starts.partition_point(|&s| s <= pos);
        let start = *self.line_starts.get(line.checked_sub(1)?)?;
        let column = self.text.get(start..pos)?.chars().count() + 1;
        Some((line, column))
    }
}

/// The diagnostic for a JSON syntax error: serde_json's message, line and
/// column, and the path of the object or array it is in.
fn syntax_diagnostic(text: &str, e: &serde_json::Error) -> Diagnostic {
    let full = e.to_string();
    let message = match full.rfind(" at line ") {
        Some(i) => full[..i].to_owned(),
        None => full,
    };
    let line = e.line().max(1);
    let column = e.column().max(1);
    let stop_at = if e.classify() == serde_json::error::Category::Eof {
        text.len()
    } else {
        line_starts(text)
            .get(line - 1)
            .map_or(text.len(), |s| s + column - 1)
    };
    let mut scanner = Scanner::new(text, stop_at);
    let _ = scanner.value();
    let path = JsonPath(scanner.stopped.unwrap_or_default());
    Diagnostic {
        path: path.to_string(),
        line: Some(line),
        column: Some(column),
        message: format!("invalid JSON: {message}"),
    }
}

// ---------------------------------------------------------------------------
// Reading a topology
// ---------------------------------------------------------------------------

/// Reads and checks the topology file at `path`; relative paths in it are
/// taken from `path`'s directory. Returns the topology, or every error found
/// (one if the file cannot be read).
///
/// ```
/// use switchboard_devices::topology::check_file;
///
/// let dir = tempfile::tempdir()?;
/// let file = dir.path().join("topology.json");
/// std::fs::write(&file, r#"{ "devices": [
///     { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock" } } ] }"#)?;
/// let topology = check_file(&file).expect("a valid topology");
/// let socket = &topology.devices[0].vhost_user().expect("a vhost-user device").socket;
/// assert_eq!(socket, &dir.path().join("rng0.sock"));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn check_file(path: &Path) -> Result<Topology> {
    let text = fs::read_to_string(path).map_err(|e| {
        vec![Diagnostic {
            path: String::new(),
            line: None,
            column: None,
            message: format!("cannot read {}: {e}", path.display()),
        }]
    })?;
    check_str(&text, path.parent().unwrap_or(Path::new("")))
}

/// Reads and checks a topology; relative paths in it are taken from
/// `base_dir`. Returns the topology, or every error found.
///
/// ```
/// use std::path::Path;
/// use switchboard_devices::topology::check_str;
///
/// let topology = check_str(
///     r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ],
///          "devices": [ { "id": "com1", "kind": "uart-16550", "bus": "pio0",
///                         "addr": "0x3f8", "output": "null" } ] }"#,
///     Path::new("/"),
/// )
/// .expect("a valid topology");
/// assert_eq!(topology.devices[0].kind_name(), "uart-16550");
///
/// let errors = check_str(
///     r#"{ "devices": [
///          { "id": "com1", "kind": "uart-16550", "bus": "isa0", "addr": 1016, "output": "null" },
///          { "id": "com2", "kind": "uart-16550", "bus": "isa0", "addr": "0x2f8", "output": "tty" } ] }"#,
///     Path::new("/"),
/// )
/// .expect_err("an invalid topology");
/// assert_eq!(errors[0].path, "devices[0].bus");
/// assert_eq!((errors[0].line, errors[0].column), (Some(2), Some(55)));
/// assert_eq!(errors[1].path, "devices[1].output");
/// ```
pub fn check_str(text: &str, base_dir: &Path) -> Result<Topology> {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Err(vec![syntax_diagnostic(text, &e)]),
    };
    let source = SourceMap::new(text);
    let mut findings: Vec<Finding> = source
        .duplicates
        .iter()
        .map(|(path, pos)| {
            let key = match path.0.last() {
                Some(Seg::Key(k)) => k.as_str(),
                _ => "",
            };
            Finding {
                path: path.clone(),
                anchor: Anchor::Offset(*pos),
                message: format!("duplicate key `{key}`: expected each key once per object"),
            }
        })
        .collect();
    let parsed = parse_topology(&value, base_dir, &mut findings);
    let buses: Vec<(JsonPath, &BusSpec)> =
        parsed.buses.iter().map(|(p, b)| (p.clone(), b)).collect();
    let devices: Vec<(JsonPath, &DeviceSpec)> =
        parsed.devices.iter().map(|(p, d)| (p.clone(), d)).collect();
    let mut checker = Checker::new(&buses, &parsed.unparsed_bus_ids);
    checker.check_all(&buses, &devices);
    findings.extend(checker.out);
    if findings.is_empty() && parsed.complete {
        Ok(Topology {
            buses: parsed.buses.into_iter().map(|(_, b)| b).collect(),
            devices: parsed.devices.into_iter().map(|(_, d)| d).collect(),
        })
    } else {
        Err(diagnostics(findings, Some(&source)))
    }
}

/// Reads one device object, as a control socket's `device-add` receives it.
/// `path_prefix` is put before the paths in diagnostics (`devices[3]`, or
/// empty); relative paths in the device are taken from `base_dir`. Checks
/// the shape only: then call [`check_device_against`].
///
/// ```
/// use std::path::Path;
/// use switchboard_devices::topology::parse_device;
///
/// let value = serde_json::json!({
///     "id": "rng1", "kind": "virtio-rng", "rate_limit": "0x1000",
///     "vhost_user": { "socket": "rng1.sock", "queues": "one" } });
/// let errors = parse_device(&value, "", Path::new("/run")).expect_err("queues is not a number");
/// assert_eq!(errors[0].path, "vhost_user.queues");
/// assert!(errors[0].message.contains("expected an integer"), "{}", errors[0].message);
/// ```
pub fn parse_device(value: &Value, path_prefix: &str, base_dir: &Path) -> Result<DeviceSpec> {
    let mut findings = Vec::new();
    match parse_device_at(
        value,
        &JsonPath::parse(path_prefix),
        base_dir,
        &mut findings,
    ) {
        Some(device) if findings.is_empty() => Ok(device),
        _ => Err(diagnostics(findings, None)),
    }
}

/// What could be read of a topology.
#[derive(Default)]
struct Parsed {
    buses: Vec<(JsonPath, BusSpec)>,
    devices: Vec<(JsonPath, DeviceSpec)>,
    /// The ids of buses that could not be read: devices on them are not
    /// reported as being on an unknown bus.
    unparsed_bus_ids: HashSet<String>,
    /// Whether the document had a usable top level.
    complete: bool,
}

fn parse_topology(value: &Value, base_dir: &Path, out: &mut Vec<Finding>) -> Parsed {
    let root = JsonPath::default();
    let mut parsed = Parsed::default();
    let Some(obj) = value.as_object() else {
        out.push(Finding::at(
            root,
            format!(
                "expected a topology object with `devices` and optionally `buses`, found {}",
                describe(value)
            ),
        ));
        return parsed;
    };
    for key in obj.keys().filter(|k| *k != "buses" && *k != "devices") {
        out.push(Finding::at_key(
            root.key(key),
            format!("unknown field `{key}`, expected `buses` or `devices`"),
        ));
    }
    parsed.complete = true;
    match obj.get("buses") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = root.key("buses").index(i);
                match deserialize_collecting::<BusSpec>(item.clone(), &at, None, out) {
                    Some(bus) => parsed.buses.push((at, bus)),
                    None => {
                        if let Some(id) = item.get("id").and_then(Value::as_str) {
                            parsed.unparsed_bus_ids.insert(id.to_owned());
                        }
                    }
                }
            }
        }
        Some(other) => out.push(Finding::at(
            root.key("buses"),
            format!("expected an array of buses, found {}", describe(other)),
        )),
    }
    match obj.get("devices") {
        None => out.push(Finding::at(
            root,
            "missing field `devices`, expected an array of devices",
        )),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = root.key("devices").index(i);
                if let Some(device) = parse_device_at(item, &at, base_dir, out) {
                    parsed.devices.push((at, device));
                }
            }
        }
        Some(other) => out.push(Finding::at(
            root.key("devices"),
            format!("expected an array of devices, found {}", describe(other)),
        )),
    }
    parsed
}

fn parse_device_at(
    value: &Value,
    at: &JsonPath,
    base_dir: &Path,
    out: &mut Vec<Finding>,
) -> Option<DeviceSpec> {
    let Some(obj) = value.as_object() else {
        out.push(Finding::at(
            at.clone(),
            format!(
                "expected a device object with a `kind`, found {}",
                describe(value)
            ),
        ));
        return None;
    };
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => k.as_str(),
        Some(other) => {
            out.push(Finding::at(
                at.key("kind"),
                format!(
                    "invalid type: {}, expected a device kind: one of {}",
                    describe(other),
                    kinds_list()
                ),
            ));
            return None;
        }
        None => {
            out.push(Finding::at(
                at.clone(),
                format!("missing field `kind`, expected one of {}", kinds_list()),
            ));
            return None;
        }
    };
    let mut rest = obj.clone();
    rest.remove("kind");
    let rest = Value::Object(rest);
    let k = Some(kind);
    let mut device = match kind {
        "virtio-blk" => deserialize_collecting(rest, at, k, out).map(DeviceSpec::VirtioBlk),
        "virtio-rng" => deserialize_collecting(rest, at, k, out).map(DeviceSpec::VirtioRng),
        "uart-16550" => deserialize_collecting(rest, at, k, out).map(DeviceSpec::Uart16550),
        "test-device" => deserialize_collecting(rest, at, k, out).map(DeviceSpec::TestDevice),
        "virtio-fault" => deserialize_collecting(rest, at, k, out).map(DeviceSpec::VirtioFault),
        other => {
            out.push(Finding::at(
                at.key("kind"),
                format!("unknown kind `{other}`, expected one of {}", kinds_list()),
            ));
            None
        }
    }?;
    device.resolve_paths(base_dir);
    Some(device)
}

/// Most errors reported for one bus or device.
const MAX_ERRORS_PER_OBJECT: usize = 16;

/// Deserializes `value` (found at `at`) into `T`, reporting every error that
/// does not follow from an earlier one.
///
/// serde stops at the first error, so after each one the value at fault is
/// removed and the object read again. A later "missing field" error for a
/// removed value is a consequence, not news, and ends the search; so does any
/// missing field (serde reports those last) or an error about the object as
/// a whole.
///
/// Returns the value when the only errors were unknown fields (it is then
/// what the text says, and the semantic checks can still look at it), and
/// `None` otherwise. Errors are in `out` either way.
fn deserialize_collecting<T: DeserializeOwned>(
    mut value: Value,
    at: &JsonPath,
    kind: Option<&str>,
    out: &mut Vec<Finding>,
) -> Option<T> {
    let mut removed: Vec<JsonPath> = Vec::new();
    // Whether a value other than an unknown field was set aside: then what
    // serde finally returns holds defaults in place of what was written.
    let mut inexact = false;
    for _ in 0..MAX_ERRORS_PER_OBJECT {
        let err = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(t) => return (!inexact).then_some(t),
            Err(e) => e,
        };
        let rel = JsonPath::from_serde(err.path());
        let message = err.into_inner().to_string();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
            .map(str::to_owned);
        if missing
            .as_deref()
            .is_some_and(|field| removed.contains(&rel.key(field)))
        {
            return None;
        }
        let unknown = message.starts_with("unknown field");
        let message = explain(kind, &rel, message);
        let path = at.join(&rel);
        out.push(if unknown {
            Finding::at_key(path, message)
        } else {
            Finding::at(path, message)
        });
        if missing.is_some() || !remove(&mut value, &rel) {
            return None;
        }
        inexact |= !unknown;
        removed.push(rel);
    }
    None
}

/// Removes the object member at `path`; false if there is none.
fn remove(value: &mut Value, path: &JsonPath) -> bool {
    let Some((Seg::Key(last), parents)) = path.0.split_last() else {
        return false;
    };
    let mut v = value;
    for seg in parents {
        let next = match seg {
            Seg::Key(k) => v.get_mut(k.as_str()),
            Seg::Index(i) => v.get_mut(*i),
        };
        match next {
            Some(n) => v = n,
            None => return false,
        }
    }
    v.as_object_mut().is_some_and(|o| o.remove(last).is_some())
}

/// Adds what serde cannot know to its message.
fn explain(kind: Option<&str>, rel: &JsonPath, message: String) -> String {
    let Some(kind) = kind else { return message };
    let field = match rel.0.as_slice() {
        [Seg::Key(k)] => Some(k.as_str()),
        _ => None,
    };
    let vhost_user = matches!(kind, "virtio-blk" | "virtio-rng" | "virtio-fault");
    match field {
        Some(f @ ("bus" | "addr")) if vhost_user && message.starts_with("unknown field") => {
            format!(
                "unknown field `{f}`: a {kind} is served over vhost-user and sits on no bus; \
                 expected no `bus` or `addr`"
            )
        }
        _ if !vhost_user && message == "missing field `bus`" => format!(
            "missing field `bus`: a {kind} has a register region, expected the id of the bus \
             it sits on"
        ),
        _ if !vhost_user && message == "missing field `addr`" => format!(
            "missing field `addr`: expected the address of the {kind}'s register region on \
             its bus"
        ),
        _ => message,
    }
}

// ---------------------------------------------------------------------------
// Checking what the types cannot express
// ---------------------------------------------------------------------------

/// Checks what the types cannot express in a list of buses and devices, as
/// described in the [module documentation](self): duplicate ids, unknown
/// buses, region overlaps, images, sockets and output files, queue counts,
/// serials and rate limits. Paths in the diagnostics are `buses[i]...` and
/// `devices[i]...`; they carry no line or column.
///
/// ```
/// use std::path::PathBuf;
/// use switchboard_devices::topology::{validate, DeviceSpec, RngSpec, VhostUserSpec};
/// use switchboard_runtime::DeviceId;
///
/// let rng = |id: &str| DeviceSpec::VirtioRng(RngSpec {
///     id: DeviceId::new(id),
///     rate_limit: None,
///     vhost_user: VhostUserSpec { socket: PathBuf::from("/nonexistent/rng.sock"), queues: 1 },
/// });
/// let errors = validate(&[], &[rng("rng0"), rng("rng0")]);
/// assert!(errors.iter().any(|d| d.path == "devices[1].id"));
/// assert!(errors.iter().any(|d| d.path == "devices[1].vhost_user.socket"
///     && d.message.contains("also the socket of device `rng0`")));
/// ```
pub fn validate(buses: &[BusSpec], devices: &[DeviceSpec]) -> Vec<Diagnostic> {
    let root = JsonPath::default();
    let buses: Vec<(JsonPath, &BusSpec)> = buses
        .iter()
        .enumerate()
        .map(|(i, b)| (root.key("buses").index(i), b))
        .collect();
    let devices: Vec<(JsonPath, &DeviceSpec)> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (root.key("devices").index(i), d))
        .collect();
    let none = HashSet::new();
    let mut checker = Checker::new(&buses, &none);
    checker.check_all(&buses, &devices);
    diagnostics(checker.out, None)
}

/// Checks adding `new` to a set of `running` devices on `buses` (all
/// already valid): `new` on its own, as [`validate`] would, and its clashes
/// with the running devices (ids, regions, sockets, output files, images).
/// The running devices themselves are not checked again; their sockets exist
/// and are in use. Paths in the diagnostics start with `path_prefix`.
///
/// ```
/// use std::path::Path;
/// use switchboard_devices::topology::{check_device_against, check_str, parse_device};
///
/// let running = check_str(
///     r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ],
///          "devices": [ { "id": "com1", "kind": "uart-16550", "bus": "pio0",
///                         "addr": "0x3f8", "output": "null" } ] }"#,
///     Path::new("/"),
/// )
/// .expect("a valid topology");
/// let new = parse_device(
///     &serde_json::json!({ "id": "com2", "kind": "uart-16550", "bus": "pio0",
///                          "addr": "0x3fc", "output": "null" }),
///     "",
///     Path::new("/"),
/// )
/// .expect("a well-formed device");
/// let errors = check_device_against(&running.buses, &running.devices, &new, "");
/// assert_eq!(errors[0].path, "addr");
/// assert!(errors[0].message.contains("overlaps device `com1`"), "{}", errors[0].message);
/// ```
pub fn check_device_against(
    buses: &[BusSpec],
    running: &[DeviceSpec],
    new: &DeviceSpec,
    path_prefix: &str,
) -> Vec<Diagnostic> {
    let bus_paths: Vec<(JsonPath, &BusSpec)> = buses
        .iter()
        .enumerate()
        .map(|(i, b)| (JsonPath::default().key("buses").index(i), b))
        .collect();
    let none = HashSet::new();
    let mut checker = Checker::new(&bus_paths, &none);
    let at = JsonPath::parse(path_prefix);
    let mut ids: HashMap<&str, String> = HashMap::new();
    for bus in buses {
        ids.insert(bus.id.as_str(), format!("bus `{}`", bus.id));
    }
    for device in running {
        ids.insert(device.id().as_str(), format!("device `{}`", device.id()));
    }
    checker.check_id(&mut ids, &at, new.id().as_str(), "device");
    checker.check_device(&at, new);
    let new_claims = Claims::of(new);
    for other in running {
        checker.check_pair((None, other, &Claims::of(other)), (&at, new, &new_claims));
    }
    diagnostics(checker.out, None)
}

/// The files a device uses, resolved to compare them across devices.
struct Claims {
    /// Sockets and output files: one device each. (field, what, file)
    exclusive: Vec<(&'static str, &'static str, PathBuf)>,
    /// A disk image and whether it is served read-only.
    image: Option<(PathBuf, bool)>,
}

impl Claims {
    fn of(device: &DeviceSpec) -> Claims {
        let mut exclusive = Vec::new();
        let mut image = None;
        match device {
            DeviceSpec::VirtioBlk(d) => {
                exclusive.push((
                    "vhost_user.socket",
                    "socket",
                    identity(&d.vhost_user.socket),
                ));
                image = Some((identity(&d.path), d.read_only));
            }
            DeviceSpec::VirtioRng(d) => {
                exclusive.push((
                    "vhost_user.socket",
                    "socket",
                    identity(&d.vhost_user.socket),
                ));
            }
            DeviceSpec::VirtioFault(d) => {
                exclusive.push((
                    "vhost_user.socket",
                    "socket",
                    identity(&d.vhost_user.socket),
                ));
            }
            DeviceSpec::Uart16550(d) => match &d.output {
                Output::File(p) => exclusive.push(("output", "output file", identity(p))),
                Output::Unix(p) => exclusive.push(("output", "socket", identity(p))),
                Output::Null | Output::Stdout | Output::Stdio => {}
            },
            DeviceSpec::TestDevice(_) => {}
        }
        Claims { exclusive, image }
    }
}

/// A path to compare files by: canonical when the file, or else its
/// directory, exists.
fn identity(path: &Path) -> PathBuf {
    if let Ok(p) = fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// `device `disk0` (devices[0])`, or without the path when there is none.
fn label(id: &DeviceId, at: Option<&JsonPath>) -> String {
    match at {
        Some(p) => format!("device `{id}` ({p})"),
        None => format!("device `{id}`"),
    }
}

fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// The semantic checks; collects findings.
struct Checker<'a> {
    buses: HashMap<&'a str, &'a BusSpec>,
    bus_order: Vec<&'a str>,
    unparsed_bus_ids: &'a HashSet<String>,
    out: Vec<Finding>,
}

impl<'a> Checker<'a> {
    fn new(buses: &[(JsonPath, &'a BusSpec)], unparsed_bus_ids: &'a HashSet<String>) -> Self {
        let mut map = HashMap::new();
        let mut order = Vec::new();
        for (_, bus) in buses {
            if map.insert(bus.id.as_str(), *bus).is_none() {
                order.push(bus.id.as_str());
            }
        }
        Checker {
            buses: map,
            bus_order: order,
            unparsed_bus_ids,
            out: Vec::new(),
        }
    }

    fn push(&mut self, path: JsonPath, message: String) {
        self.out.push(Finding::at(path, message));
    }

    /// Checks a whole topology (or what could be read of it).
    fn check_all(&mut self, buses: &[(JsonPath, &BusSpec)], devices: &[(JsonPath, &DeviceSpec)]) {
        let mut ids: HashMap<&str, String> = HashMap::new();
        for (at, bus) in buses {
            self.check_id(&mut ids, at, bus.id.as_str(), "bus");
            self.check_bus(at, bus);
        }
        let mut claims = Vec::new();
        for (at, device) in devices {
            self.check_id(&mut ids, at, device.id().as_str(), "device");
            self.check_device(at, device);
            claims.push(Claims::of(device));
        }
        for (j, (at_b, b)) in devices.iter().enumerate() {
            for (i, (at_a, a)) in devices[..j].iter().enumerate() {
                self.check_pair((Some(at_a), a, &claims[i]), (at_b, b, &claims[j]));
            }
        }
    }

    /// Buses and devices share one namespace.
    fn check_id<'i>(
        &mut self,
        ids: &mut HashMap<&'i str, String>,
        at: &JsonPath,
        id: &'i str,
        what: &str,
    ) {
        match ids.get(id) {
            Some(owner) => self.push(
                at.key("id"),
                format!(
                    "duplicate id `{id}`: already the id of {owner}; expected an id no other \
                     bus or device has"
                ),
            ),
            None => {
                ids.insert(id, format!("{what} `{id}` ({at})"));
            }
        }
    }

    fn check_bus(&mut self, at: &JsonPath, bus: &BusSpec) {
        match bus.size {
            Some(0) => self.push(
                at.key("size"),
                "expected a bus size of at least 1, found 0".into(),
            ),
            Some(size) if bus.kind == BusKind::Pio && size > PIO_SPACE_SIZE => self.push(
                at.key("size"),
                format!(
                    "expected a PIO bus size of at most {PIO_SPACE_SIZE:#x} (64 KiB), found \
                     {size:#x}"
                ),
            ),
            _ => {}
        }
    }

    fn check_device(&mut self, at: &JsonPath, device: &DeviceSpec) {
        let kind = device.kind_name();
        match device {
            DeviceSpec::VirtioBlk(d) => {
                self.check_image(&at.key("path"), &d.path, d.read_only);
                if let Some(serial) = &d.serial {
                    if serial.len() > ID_LEN {
                        self.push(
                            at.key("serial"),
                            format!(
                                "expected a serial of at most {ID_LEN} bytes, found {} bytes",
                                serial.len()
                            ),
                        );
                    }
                }
                let q = d.vhost_user.queues;
                if !(1..=MAX_QUEUES).contains(&q) {
                    self.push(
                        at.key("vhost_user").key("queues"),
                        format!("expected 1 to {MAX_QUEUES} queues for a {kind}, found {q}"),
                    );
                }
                self.check_socket(&at.key("vhost_user").key("socket"), &d.vhost_user.socket);
            }
            DeviceSpec::VirtioRng(d) => {
                if d.rate_limit == Some(0) {
                    self.push(
                        at.key("rate_limit"),
                        "expected a rate limit of at least 1 byte per second (leave \
                         `rate_limit` out for no limit), found 0"
                            .into(),
                    );
                }
                let q = d.vhost_user.queues;
                if q != 1 {
                    self.push(
                        at.key("vhost_user").key("queues"),
                        format!("expected 1 queue (a {kind} has one request queue), found {q}"),
                    );
                }
                self.check_socket(&at.key("vhost_user").key("socket"), &d.vhost_user.socket);
            }
            DeviceSpec::VirtioFault(d) => {
                if d.hold > MAX_HOLD {
                    self.push(
                        at.key("hold"),
                        format!(
                            "expected at most {MAX_HOLD} requests held (the queue must still \
                             have room for the one that panics), found {}",
                            d.hold
                        ),
                    );
                } else if u64::from(d.hold) > d.panic_after {
                    self.push(
                        at.key("hold"),
                        format!(
                            "expected at most `panic_after` ({}) requests held: the requests \
                             held are among those before the panic, found {}",
                            d.panic_after, d.hold
                        ),
                    );
                }
                let q = d.vhost_user.queues;
                if q != 1 {
                    self.push(
                        at.key("vhost_user").key("queues"),
                        format!("expected 1 queue (a {kind} has one request queue), found {q}"),
                    );
                }
                self.check_socket(&at.key("vhost_user").key("socket"), &d.vhost_user.socket);
            }
            DeviceSpec::Uart16550(d) => match &d.output {
                Output::File(p) => self.check_output_file(&at.key("output"), p),
                Output::Unix(p) => self.check_socket(&at.key("output"), p),
                Output::Null | Output::Stdout | Output::Stdio => {}
            },
            DeviceSpec::TestDevice(_) => {}
        }
        if let Some(place) = device.placement() {
            self.check_placement(at, device, &place);
        }
    }

    fn check_placement(&mut self, at: &JsonPath, device: &DeviceSpec, place: &Placement<'_>) {
        let bus_id = place.bus.as_str();
        let Some(bus) = self.buses.get(bus_id) else {
            if self.unparsed_bus_ids.contains(bus_id) {
                return;
            }
            let message = if self.bus_order.is_empty() {
                format!("unknown bus `{bus_id}`: the topology has no `buses`")
            } else {
                let known: Vec<String> = self.bus_order.iter().map(|b| format!("`{b}`")).collect();
                format!(
                    "unknown bus `{bus_id}`, expected one of {}",
                    known.join(", ")
                )
            };
            self.push(at.key("bus"), message);
            return;
        };
        let bus_size = bus.size();
        if place.end() > bus_size {
            let message = match bus_size.checked_sub(u128::from(place.size)) {
                Some(last) => format!(
                    "the {}-byte region of {} `{}` at {} ends beyond bus `{bus_id}` ({bus_size:#x} \
                     bytes): expected an address from 0x0 to {last:#x}",
                    place.size,
                    device.kind_name(),
                    device.id(),
                    place.addr,
                ),
                None => format!(
                    "bus `{bus_id}` ({bus_size:#x} bytes) is smaller than the {}-byte region of \
                     {} `{}`",
                    place.size,
                    device.kind_name(),
                    device.id()
                ),
            };
            self.push(at.key("addr"), message);
        }
    }

    fn check_image(&mut self, at: &JsonPath, path: &Path, read_only: bool) {
        if path.as_os_str().is_empty() {
            self.push(
                at.clone(),
                "expected the path of a raw image, found an empty string".into(),
            );
            return;
        }
        let shown = path.display();
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.push(
                    at.clone(),
                    format!("image {shown} does not exist; expected a raw image file"),
                );
                return;
            }
            Err(e) => {
                self.push(at.clone(), format!("cannot inspect image {shown}: {e}"));
                return;
            }
        };
        if !meta.is_file() {
            self.push(
                at.clone(),
                format!("image {shown} is not a regular file; expected a raw image file"),
            );
            return;
        }
        if let Err(e) = OpenOptions::new().read(true).open(path) {
            self.push(
                at.clone(),
                format!(
                    "image {shown} cannot be opened for reading ({}); expected a readable file",
                    describe_io(&e)
                ),
            );
            return;
        }
        if meta.len() < SECTOR_SIZE {
            self.push(
                at.clone(),
                format!(
                    "image {shown} is {} bytes; expected at least one {SECTOR_SIZE}-byte sector",
                    meta.len()
                ),
            );
        }
        if !read_only {
            if let Err(e) = OpenOptions::new().read(true).write(true).open(path) {
                self.push(
                    at.clone(),
                    format!(
                        "image {shown} cannot be opened for writing ({}); expected a writable \
                         file, or \"read_only\": true",
                        describe_io(&e)
                    ),
                );
            }
        }
    }

    fn check_socket(&mut self, at: &JsonPath, path: &Path) {
        if path.as_os_str().is_empty() {
            self.push(
                at.clone(),
                "expected a socket path, found an empty string".into(),
            );
            return;
        }
        let shown = path.display();
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            self.push(
                at.clone(),
                format!(
                    "socket path {shown} is {len} bytes; expected at most {MAX_SOCKET_PATH} (the \
                     size of a unix socket address)"
                ),
            );
        }
        match check_socket_path(path) {
            Ok(()) => {}
            Err(vhost_user::Error::NotASocket { .. }) => self.push(
                at.clone(),
                format!(
                    "{shown} exists and is not a socket; expected a path that does not exist \
                     or a stale socket"
                ),
            ),
            Err(e) => self.push(at.clone(), error_chain(&e)),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                self.push(
                    at.clone(),
                    format!(
                        "directory {} of socket {shown} does not exist",
                        dir.display()
                    ),
                );
            }
        }
    }

    fn check_output_file(&mut self, at: &JsonPath, path: &Path) {
        let shown = path.display();
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => self.push(
                at.clone(),
                format!("output file {shown} is a directory; expected a file"),
            ),
            Ok(m) if m.is_file() => {
                if let Err(e) = OpenOptions::new().append(true).open(path) {
                    self.push(
                        at.clone(),
                        format!(
                            "output file {shown} cannot be opened for appending ({})",
                            describe_io(&e)
                        ),
                    );
                }
            }
            // A device node or a FIFO: opening one may block or have effects.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if !dir.is_dir() {
                        self.push(
                            at.clone(),
                            format!(
                                "directory {} of output file {shown} does not exist",
                                dir.display()
                            ),
                        );
                    }
                }
            }
            Err(e) => self.push(
                at.clone(),
                format!("cannot inspect output file {shown}: {e}"),
            ),
        }
    }

    /// Clashes between an earlier device `a` and a later one `b`, reported
    /// on `b`.
    fn check_pair(
        &mut self,
        (at_a, a, claims_a): (Option<&JsonPath>, &DeviceSpec, &Claims),
        (at_b, b, claims_b): (&JsonPath, &DeviceSpec, &Claims),
    ) {
        let other = label(a.id(), at_a);
        if let (Some(pa), Some(pb)) = (a.placement(), b.placement()) {
            if pa.bus == pb.bus
                && u128::from(pb.addr.0) < pa.end()
                && u128::from(pa.addr.0) < pb.end()
            {
                self.push(
                    at_b.key("addr"),
                    format!(
                        "region {}..{:#x} of `{}` overlaps {other} at {}..{:#x} on bus `{}`; \
                         expected regions that do not overlap",
                        pb.addr,
                        pb.end(),
                        b.id(),
                        pa.addr,
                        pa.end(),
                        pb.bus
                    ),
                );
            }
        }
        for (field_b, what_b, file_b) in &claims_b.exclusive {
            for (_, what_a, file_a) in &claims_a.exclusive {
                if file_a == file_b {
                    self.push(
                        at_b.join(&JsonPath::parse(field_b)),
                        format!(
                            "{what_b} {} is also the {what_a} of {other}; expected one device \
                             per path",
                            file_b.display()
                        ),
                    );
                }
            }
        }
        if let (Some((image_a, ro_a)), Some((image_b, ro_b))) = (&claims_a.image, &claims_b.image) {
            if image_a == image_b && !(*ro_a && *ro_b) {
                self.push(
                    at_b.key("path"),
                    format!(
                        "image {} is also served by {other}; expected devices to share an image \
                         only when all of them are read-only",
                        image_b.display()
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_image() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = fs::File::create(dir.path().join("disk.img")).expect("create image");
        image.set_len(1 << 20).expect("size image");
        dir
    }

    fn errors(text: &str, base: &Path) -> Vec<Diagnostic> {
        check_str(text, base).expect_err("an invalid topology")
    }

    #[test]
    fn test_num_accepts_numbers_and_decimal_and_hex_strings() {
        for (text, want) in [
            ("1016", 1016),
            ("\"1016\"", 1016),
            ("\"0x3f8\"", 0x3f8),
            ("\"0X3F8\"", 0x3f8),
        ] {
            let n: Num<u64> = serde_json::from_str(text).expect(text);
            assert_eq!(n.0, want, "{text}");
        }
    }

    #[test]
    fn test_num_rejects_signs_fractions_junk_and_overflow() {
        for text in [
            "-1",
            "1.5",
            "\"0x\"",
            "\"0x3g8\"",
            "\"+5\"",
            "\" 5\"",
            "\"\"",
            "true",
            "70000",
        ] {
            let err = serde_json::from_str::<Num<u16>>(text)
                .err()
                .unwrap_or_else(|| panic!("{text} was accepted"));
            assert!(
                err.to_string()
                    .contains("expected an integer from 0 to 65535"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn test_json_path_display_and_parse_round_trip() {
        let p = JsonPath::default()
            .key("devices")
            .index(2)
            .key("vhost_user")
            .key("socket");
        assert_eq!(p.to_string(), "devices[2].vhost_user.socket");
        assert_eq!(JsonPath::parse(&p.to_string()), p);
        let odd = JsonPath::default().key("a b").key("c.d").index(0);
        assert_eq!(odd.to_string(), r#"["a b"]["c.d"][0]"#);
        assert_eq!(JsonPath::parse(&odd.to_string()), odd);
        assert_eq!(JsonPath::parse("").to_string(), "");
    }

    #[test]
    fn test_source_map_locates_values_and_keys() {
        let text = "{\n  \"devices\": [\n    { \"id\": \"a\",\n      \"kind\": 7 }\n  ]\n}";
        let map = SourceMap::new(text);
        let kind = JsonPath::parse("devices[0].kind");
        let at = |anchor| map.line_col(map.locate(&kind, anchor).expect("found"));
        assert_eq!(at(Anchor::Value), Some((4, 15)));
        assert_eq!(at(Anchor::Key), Some((4, 7)));
        // A path that goes further than the text points at the deepest value.
        let deep = JsonPath::parse("devices[0].vhost_user.socket");
        let pos = map.locate(&deep, Anchor::Value).expect("found");
        assert_eq!(map.line_col(pos), Some((3, 5)));
    }

    #[test]
    fn test_syntax_error_names_the_enclosing_path() {
        let text = "{ \"devices\": [\n  { \"id\": \"rng0\", \"kind\": \"virtio-rng\",\n    \"vhost_user\": { \"socket\": \"r.sock\", } } ] }";
        let e = errors(text, Path::new("/"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].path, "devices[0].vhost_user");
        assert_eq!((e[0].line, e[0].column), (Some(3), Some(41)));
        assert!(e[0].message.contains("trailing comma"), "{}", e[0].message);
    }

    #[test]
    fn test_truncated_text_names_the_innermost_open_value() {
        let text = "{ \"devices\": [ { \"id\": \"rng0\", \"vhost_user\": { \"socket\": \"r.sock\"";
        let e = errors(text, Path::new("/"));
        assert_eq!(e[0].path, "devices[0].vhost_user");
        assert!(e[0].message.contains("EOF"), "{}", e[0].message);
    }

    #[test]
    fn test_independent_errors_in_one_device_are_all_reported() {
        let text = r#"{ "devices": [ { "id": "d0", "kind": "virtio-blk", "path": "disk.img",
            "read_only": "no", "colour": "red",
            "vhost_user": { "socket": "d0.sock", "queues": "two" } } ] }"#;
        let dir = dir_with_image();
        let e = errors(text, dir.path());
        let paths: Vec<&str> = e.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "devices[0].read_only",
                "devices[0].colour",
                "devices[0].vhost_user.queues"
            ],
            "{e:#?}"
        );
    }

    #[test]
    fn test_device_with_only_unknown_fields_is_still_checked_for_meaning() {
        let text = r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
            { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": "0x3f8", "output": "null" },
            { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": "0x3fc", "output": "null", "baud": 9600 },
            { "id": "com3", "kind": "uart-16550", "bus": "pio0", "addr": "0x3e8", "output": 1 },
            { "id": "com3", "kind": "uart-16550", "bus": "pio0", "addr": "0x3e8", "output": "null" } ] }"#;
        let e = errors(text, Path::new("/"));
        let paths: Vec<&str> = e.iter().map(|d| d.path.as_str()).collect();
        // devices[2] has a wrong type, so it is not checked further: its
        // twin devices[3] is reported for nothing.
        assert_eq!(
            paths,
            [
                "devices[1].id",
                "devices[1].addr",
                "devices[1].baud",
                "devices[2].output"
            ],
            "{e:#?}"
        );
    }

    #[test]
    fn test_removed_required_field_is_not_reported_as_missing() {
        let text = r#"{ "devices": [ { "id": "d0", "kind": "virtio-blk", "path": 5,
            "vhost_user": { "socket": "d0.sock" } } ] }"#;
        let e = errors(text, Path::new("/"));
        assert_eq!(e.len(), 1, "{e:#?}");
        assert_eq!(e[0].path, "devices[0].path");
    }

    #[test]
    fn test_relative_paths_resolve_against_the_base_dir() {
        let dir = dir_with_image();
        let text = r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
            { "id": "d0", "kind": "virtio-blk", "path": "disk.img", "vhost_user": { "socket": "d0.sock" } },
            { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": 1016, "output": "file:com1.log" } ] }"#;
        let t = check_str(text, dir.path()).expect("valid");
        let DeviceSpec::VirtioBlk(blk) = &t.devices[0] else {
            panic!("not a blk: {:?}", t.devices[0]);
        };
        assert_eq!(blk.path, dir.path().join("disk.img"));
        assert_eq!(blk.vhost_user.socket, dir.path().join("d0.sock"));
        let DeviceSpec::Uart16550(uart) = &t.devices[1] else {
            panic!("not a uart: {:?}", t.devices[1]);
        };
        assert_eq!(uart.output, Output::File(dir.path().join("com1.log")));
    }

    #[test]
    fn test_derived_deserialize_agrees_with_check_str() {
        let dir = dir_with_image();
        let text = r#"{ "buses": [ { "id": "mmio0", "kind": "mmio", "size": "0x100000000" } ], "devices": [
            { "id": "d0", "kind": "virtio-blk", "path": "disk.img", "read_only": true, "serial": "s",
              "vhost_user": { "socket": "d0.sock", "queues": "0x2" } },
            { "id": "r0", "kind": "virtio-rng", "rate_limit": 4096, "vhost_user": { "socket": "r0.sock" } },
            { "id": "t0", "kind": "test-device", "bus": "mmio0", "addr": "0xd0000000", "read_delay_us": "100" } ] }"#;
        let mut derived: Topology = serde_json::from_str(text).expect("derived");
        for d in &mut derived.devices {
            d.resolve_paths(dir.path());
        }
        assert_eq!(check_str(text, dir.path()).expect("valid"), derived);
        let round: Topology =
            serde_json::from_str(&serde_json::to_string(&derived).expect("serialize"))
                .expect("re-read");
        assert_eq!(round, derived);
    }

    #[test]
    fn test_mmio_bus_spans_the_whole_64_bit_space() {
        let text = r#"{ "buses": [ { "id": "mmio0", "kind": "mmio" } ], "devices": [
            { "id": "t0", "kind": "test-device", "bus": "mmio0", "addr": "0xffffffffffffffe0" } ] }"#;
        check_str(text, Path::new("/")).expect("the last 32 bytes fit");
        let text = text.replace("ffe0", "ffe8");
        let e = errors(&text, Path::new("/"));
        assert_eq!(e[0].path, "devices[0].addr");
    }

    #[test]
    fn test_device_on_a_bus_that_failed_to_parse_is_not_on_an_unknown_bus() {
        let text = r#"{ "buses": [ { "id": "pio0", "kind": "isa" } ], "devices": [
            { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": 1016, "output": "null" } ] }"#;
        let e = errors(text, Path::new("/"));
        assert_eq!(e.len(), 1, "{e:#?}");
        assert_eq!(e[0].path, "buses[0].kind");
    }

    #[test]
    fn test_check_device_against_reports_clashes_with_running_devices() {
        let dir = dir_with_image();
        let running = check_str(
            r#"{ "devices": [ { "id": "d0", "kind": "virtio-blk", "path": "disk.img",
                "vhost_user": { "socket": "d0.sock" } } ] }"#,
            dir.path(),
        )
        .expect("valid");
        let new = parse_device(
            &serde_json::json!({ "id": "d0", "kind": "virtio-blk", "path": "disk.img",
                                 "read_only": true, "vhost_user": { "socket": "d0.sock" } }),
            "devices[1]",
            dir.path(),
        )
        .expect("well-formed");
        let e = check_device_against(&running.buses, &running.devices, &new, "devices[1]");
        let paths: Vec<&str> = e.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "devices[1].id",
                "devices[1].vhost_user.socket",
                "devices[1].path"
            ],
            "{e:#?}"
        );
        assert!(e.iter().all(|d| d.line.is_none()));
    }

    #[test]
    fn test_diagnostic_display_with_and_without_position() {
        let d = Diagnostic {
            path: "devices[2].vhost_user.socket".into(),
            line: Some(7),
            column: Some(30),
            message: "expected a string, found 5".into(),
        };
        assert_eq!(
            d.in_file(Path::new("t.json")).to_string(),
            "t.json:7:30: devices[2].vhost_user.socket: expected a string, found 5"
        );
        let d = Diagnostic {
            path: String::new(),
            line: None,
            column: None,
            message: "cannot read".into(),
        };
        assert_eq!(
            d.in_file(Path::new("t.json")).to_string(),
            "t.json: cannot read"
        );
    }

    #[test]
    fn test_fault_device_reads_its_schedule_and_checks_hold_and_queues() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = r#"{ "devices": [
            { "id": "f0", "kind": "virtio-fault", "panic_after": "0x4", "hold": 2,
              "panic_in": "io-thread", "fail_status": "0xee", "vhost_user": { "socket": "f0.sock" } },
            { "id": "f1", "kind": "virtio-fault", "vhost_user": { "socket": "f1.sock" } } ] }"#;
        let t = check_str(text, dir.path()).expect("valid");
        let DeviceSpec::VirtioFault(f) = &t.devices[0] else {
            panic!("not a fault device: {:?}", t.devices[0]);
        };
        assert_eq!(
            f.config(),
            FaultConfig {
                panic_after: 4,
                hold: 2,
                panic_in: PanicIn::IoThread,
                fail_status: Some(0xee),
            }
        );
        assert_eq!(f.vhost_user.socket, dir.path().join("f0.sock"));
        assert_eq!(t.devices[1].kind_name(), "virtio-fault");
        let DeviceSpec::VirtioFault(f) = &t.devices[1] else {
            panic!("not a fault device: {:?}", t.devices[1]);
        };
        assert_eq!(f.config(), FaultConfig::default());

        let text = r#"{ "devices": [
            { "id": "f0", "kind": "virtio-fault", "panic_after": 1, "hold": 2,
              "vhost_user": { "socket": "f0.sock", "queues": 2 } },
            { "id": "f1", "kind": "virtio-fault", "panic_after": 1000, "hold": 256,
              "fail_status": 256, "panic_in": "later", "vhost_user": { "socket": "f1.sock" } } ] }"#;
        let e = errors(text, dir.path());
        let paths: Vec<&str> = e.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "devices[0].hold",
                "devices[0].vhost_user.queues",
                "devices[1].fail_status",
                "devices[1].panic_in",
            ],
            "{e:#?}"
        );
        assert!(
            e[0].message.contains("`panic_after` (1)"),
            "{}",
            e[0].message
        );
        let text = r#"{ "devices": [ { "id": "f1", "kind": "virtio-fault", "panic_after": 1000,
            "hold": 256, "vhost_user": { "socket": "f1.sock" } } ] }"#;
        let e = errors(text, dir.path());
        assert_eq!(e[0].path, "devices[0].hold");
        assert!(e[0].message.contains("at most 255"), "{}", e[0].message);
    }

    #[test]
    fn test_schema_file_is_current() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/topology.schema.json");
        let want = schema_json();
        if std::env::var_os("UPDATE_SCHEMA").is_some_and(|v| v == "1") {
            fs::write(&file, &want).expect("write the schema");
            return;
        }
        let have = fs::read_to_string(&file).unwrap_or_default();
        assert!(
            have == want,
            "{} does not match the types in devices/src/topology.rs; regenerate it with \
             `UPDATE_SCHEMA=1 cargo test -p switchboard-devices --lib topology::tests::test_schema_file_is_current`",
            file.display()
        );
    }
}
