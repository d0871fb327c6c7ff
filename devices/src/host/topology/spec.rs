// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The types: the topology, its buses and its devices, as checked.

use super::*;

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
    /// What is done when the device fails (default `"never"`: it stays
    /// stopped).
    #[serde(default, skip_serializing_if = "RestartPolicy::is_never")]
    pub restart: RestartPolicy,
}

impl VhostUserSpec {
    /// A device on `socket` with `queues` virtqueues, never restarted.
    pub fn new(socket: impl Into<PathBuf>, queues: u16) -> Self {
        VhostUserSpec {
            socket: socket.into(),
            queues,
            restart: RestartPolicy::Never,
        }
    }
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

    /// Checks a number of virtqueues: 1 to [`MAX_QUEUES`].
    ///
    /// ```
    /// use switchboard_devices::host::topology::BlkSpec;
    ///
    /// assert!(BlkSpec::check_queues(2).is_ok());
    /// let e = BlkSpec::check_queues(65).expect_err("too many");
    /// assert_eq!(e.to_string(), "vhost_user.queues: expected 1 to 64 queues for a virtio-blk, found 65");
    /// ```
    pub fn check_queues(queues: u16) -> std::result::Result<(), Invalid> {
        if (1..=MAX_QUEUES).contains(&queues) {
            return Ok(());
        }
        Err(Invalid::new(
            "vhost_user.queues",
            format!(
                "expected 1 to {MAX_QUEUES} queues for a {}, found {queues}",
                DeviceKind::VirtioBlk
            ),
        ))
    }

    /// Checks a serial number (GET_ID): at most [`ID_LEN`] bytes.
    pub fn check_serial(serial: &str) -> std::result::Result<(), Invalid> {
        if serial.len() <= ID_LEN {
            return Ok(());
        }
        Err(Invalid::new(
            "serial",
            format!(
                "expected a serial of at most {ID_LEN} bytes, found {} bytes",
                serial.len()
            ),
        ))
    }

    /// The options to open the image with ([`crate::models::blk::Blk::open`]).
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

    /// Checks a rate limit: at least 1 byte per second (`None` is no limit).
    pub fn check_rate_limit(rate_limit: Option<u64>) -> std::result::Result<(), Invalid> {
        if rate_limit != Some(0) {
            return Ok(());
        }
        Err(Invalid::new(
            "rate_limit",
            "expected a rate limit of at least 1 byte per second (leave `rate_limit` out for \
             no limit), found 0"
                .into(),
        ))
    }
}

/// The fault-injection test device (an entropy device that panics on a
/// chosen request), served over vhost-user. For testing only.
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

    /// Checks `hold` against [`MAX_HOLD`] and `panic_after`.
    pub fn check_hold(hold: u16, panic_after: u64) -> std::result::Result<(), Invalid> {
        if hold > MAX_HOLD {
            return Err(Invalid::new(
                "hold",
                format!(
                    "expected at most {MAX_HOLD} requests held (the queue must still have room \
                     for the one that panics), found {hold}"
                ),
            ));
        }
        if u64::from(hold) > panic_after {
            return Err(Invalid::new(
                "hold",
                format!(
                    "expected at most `panic_after` ({panic_after}) requests held: the requests \
                     held are among those before the panic, found {hold}"
                ),
            ));
        }
        Ok(())
    }

    /// The device's configuration for [`crate::models::fault::FaultDevice`].
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

pub(super) const OUTPUT_EXPECTED: &str =
    "an output: \"stdout\", \"stdio\", \"null\", \"file:PATH\" or \"unix:PATH\"";

impl Output {
    pub(super) fn parse(s: &str) -> Option<Output> {
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

pub(super) struct OutputVisitor;

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

/// The slow test device, with a 32-byte register region on a bus.
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

    /// The device's configuration for [`crate::SlowDevice`].
    pub fn config(&self) -> SlowDeviceConfig {
        SlowDeviceConfig {
            read_delay: Duration::from_micros(self.read_delay_us),
            record: false,
        }
    }
}

/// One device of a topology, told apart by `kind` ([`DeviceKind`]).
///
/// As JSON, the fields of its spec plus `kind`. Its serde and schema
/// implementations take the tag from [`DeviceKind`], so a kind's name is
/// written only in its model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A virtio-blk disk on a raw image, served over vhost-user.
    VirtioBlk(BlkSpec),
    /// A virtio-rng entropy source, served over vhost-user.
    VirtioRng(RngSpec),
    /// A 16550A UART with an 8-byte register region on a bus.
    Uart16550(UartSpec),
    /// The slow test device, with a 32-byte register region on a bus.
    TestDevice(TestDeviceSpec),
    /// The fault-injection test device (an entropy device that panics on a
    /// chosen request), served over vhost-user. For testing only.
    VirtioFault(FaultSpec),
}

/// The spec of one device kind: one of the structs a [`DeviceSpec`] holds.
pub trait KindSpec: Serialize + DeserializeOwned + JsonSchema + Into<DeviceSpec> {
    /// The kind.
    const KIND: DeviceKind;

    /// The device's id.
    fn id(&self) -> &DeviceId;

    /// Checks the values the types cannot restrict (queue counts, lengths,
    /// limits), without looking at the file system: what the topology
    /// checker, the control socket's `device-add` and the command line all
    /// use.
    fn validate(&self) -> Vec<Invalid>;
}

/// `match` on a [`DeviceSpec`] with the same code for every kind: `$d` is
/// the kind's spec.
macro_rules! each_spec {
    ($spec:expr, $d:ident => $body:expr) => {
        match $spec {
            DeviceSpec::VirtioBlk($d) => $body,
            DeviceSpec::VirtioRng($d) => $body,
            DeviceSpec::Uart16550($d) => $body,
            DeviceSpec::TestDevice($d) => $body,
            DeviceSpec::VirtioFault($d) => $body,
        }
    };
}

/// `match` on a [`DeviceKind`] with the same code for every kind: `$t` is
/// the kind's spec type. This and the enum above are where a new kind is
/// registered in the topology.
macro_rules! each_kind {
    ($kind:expr, $t:ident => $body:expr) => {
        match $kind {
            DeviceKind::VirtioBlk => {
                type $t = BlkSpec;
                $body
            }
            DeviceKind::VirtioRng => {
                type $t = RngSpec;
                $body
            }
            DeviceKind::Uart16550 => {
                type $t = UartSpec;
                $body
            }
            DeviceKind::TestDevice => {
                type $t = TestDeviceSpec;
                $body
            }
            DeviceKind::VirtioFault => {
                type $t = FaultSpec;
                $body
            }
        }
    };
}
pub(super) use each_kind;

macro_rules! kind_spec {
    ($t:ty, $variant:ident, $kind:ident, |$d:ident| $validate:expr) => {
        impl From<$t> for DeviceSpec {
            fn from(d: $t) -> DeviceSpec {
                DeviceSpec::$variant(d)
            }
        }

        impl KindSpec for $t {
            const KIND: DeviceKind = DeviceKind::$kind;

            fn id(&self) -> &DeviceId {
                &self.id
            }

            fn validate(&self) -> Vec<Invalid> {
                let $d = self;
                $validate
            }
        }
    };
}

kind_spec!(BlkSpec, VirtioBlk, VirtioBlk, |d| {
    let serial = d.serial.as_deref().map(BlkSpec::check_serial);
    let queues = BlkSpec::check_queues(d.vhost_user.queues);
    [serial.unwrap_or(Ok(())), queues]
        .into_iter()
        .filter_map(std::result::Result::err)
        .chain(d.vhost_user.restart.check())
        .collect()
});
kind_spec!(RngSpec, VirtioRng, VirtioRng, |d| {
    let limit = RngSpec::check_rate_limit(d.rate_limit);
    let queues = VhostUserSpec::check_one_queue(DeviceKind::VirtioRng, d.vhost_user.queues);
    [limit, queues]
        .into_iter()
        .filter_map(std::result::Result::err)
        .chain(d.vhost_user.restart.check())
        .collect()
});
kind_spec!(FaultSpec, VirtioFault, VirtioFault, |d| {
    let hold = FaultSpec::check_hold(d.hold, d.panic_after);
    let queues = VhostUserSpec::check_one_queue(DeviceKind::VirtioFault, d.vhost_user.queues);
    [hold, queues]
        .into_iter()
        .filter_map(std::result::Result::err)
        .chain(d.vhost_user.restart.check())
        .collect()
});
kind_spec!(UartSpec, Uart16550, Uart16550, |_d| Vec::new());
kind_spec!(TestDeviceSpec, TestDevice, TestDevice, |_d| Vec::new());

impl VhostUserSpec {
    /// Checks the number of virtqueues of a kind that has one request
    /// queue (virtio-rng, virtio-fault).
    pub fn check_one_queue(kind: DeviceKind, queues: u16) -> std::result::Result<(), Invalid> {
        if queues == 1 {
            return Ok(());
        }
        Err(Invalid::new(
            "vhost_user.queues",
            format!("expected 1 queue (a {kind} has one request queue), found {queues}"),
        ))
    }
}

/// A value of a device spec out of its range, found by
/// [`KindSpec::validate`] or one of the `check_*` functions of the specs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field, as a path in the device object (`vhost_user.queues`).
    pub field: &'static str,
    /// What was expected, and what was found.
    pub message: String,
}

impl Invalid {
    pub(super) fn new(field: &'static str, message: String) -> Self {
        Invalid { field, message }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let value = each_spec!(self, d => serde_json::to_value(d)).map_err(S::Error::custom)?;
        let Value::Object(mut fields) = value else {
            return Err(S::Error::custom("a device spec is an object"));
        };
        fields.insert("kind".into(), Value::String(self.kind_name().into()));
        fields.serialize(s)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let mut fields = serde_json::Map::deserialize(d)?;
        let kind = match fields.remove("kind") {
            Some(Value::String(k)) => k,
            Some(other) => {
                return Err(de::Error::custom(format!(
                    "invalid type: {}, expected a device kind",
                    describe(&other)
                )))
            }
            None => return Err(de::Error::missing_field("kind")),
        };
        let kind: DeviceKind = kind
            .parse()
            .map_err(|_| de::Error::unknown_variant(&kind, &DeviceKind::NAMES))?;
        let rest = Value::Object(fields);
        each_kind!(kind, T => serde_json::from_value::<T>(rest).map(DeviceSpec::from))
            .map_err(de::Error::custom)
    }
}

impl JsonSchema for DeviceSpec {
    fn schema_name() -> Cow<'static, str> {
        "DeviceSpec".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        // As schemars derives it for a tag on newtype variants: each spec's
        // schema inline (each denies unknown fields), with the tag first.
        let variants: Vec<Value> = DeviceKind::ALL
            .into_iter()
            .map(|kind| {
                let mut schema = each_kind!(kind, T => T::json_schema(generator));
                let obj = schema.ensure_object();
                obj.insert("type".into(), "object".into());
                if let Some(Value::Object(properties)) = obj.get_mut("properties") {
                    properties.insert(
                        "kind".into(),
                        serde_json::json!({ "type": "string", "const": kind.as_str() }),
                    );
                }
                if let Some(Value::Array(required)) = obj.get_mut("required") {
                    required.insert(0, "kind".into());
                }
                schema.to_value()
            })
            .collect();
        json_schema!({
            "description": "One device of a topology, told apart by `kind`.",
            "oneOf": variants
        })
    }
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
    pub(super) fn end(&self) -> u128 {
        u128::from(self.addr.0) + u128::from(self.size)
    }
}

impl DeviceSpec {
    /// The device's id.
    pub fn id(&self) -> &DeviceId {
        each_spec!(self, d => KindSpec::id(d))
    }

    /// The kind.
    pub fn kind(&self) -> DeviceKind {
        fn kind_of<T: KindSpec>(_: &T) -> DeviceKind {
            T::KIND
        }
        each_spec!(self, d => kind_of(d))
    }

    /// The kind, as written in `kind` (`virtio-blk`).
    pub fn kind_name(&self) -> &'static str {
        self.kind().as_str()
    }

    /// Checks the values the types cannot restrict ([`KindSpec::validate`]).
    ///
    /// ```
    /// use std::path::PathBuf;
    /// use switchboard_devices::host::topology::{DeviceSpec, RngSpec, VhostUserSpec};
    /// use switchboard_runtime::DeviceId;
    ///
    /// let rng = DeviceSpec::VirtioRng(RngSpec {
    ///     id: DeviceId::new("rng0"),
    ///     rate_limit: Some(0),
    ///     vhost_user: VhostUserSpec::new(PathBuf::from("rng0.sock"), 2),
    /// });
    /// let fields: Vec<&str> = rng.validate().iter().map(|e| e.field).collect();
    /// assert_eq!(fields, ["rate_limit", "vhost_user.queues"]);
    /// ```
    pub fn validate(&self) -> Vec<Invalid> {
        each_spec!(self, d => d.validate())
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
    pub(super) fn resolve_paths(&mut self, base_dir: &Path) {
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
