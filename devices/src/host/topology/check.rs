// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Checking what the types cannot express: ids, buses, regions, files and sockets.

use super::*;

/// Checks what the types cannot express in a list of buses and devices, as
/// described in the [module documentation](super): duplicate ids, unknown
/// buses, region overlaps, images, sockets and output files, queue counts,
/// serials and rate limits. Paths in the diagnostics are `buses[i]...` and
/// `devices[i]...`; they carry no line or column.
///
/// ```
/// use std::path::PathBuf;
/// use switchboard_devices::host::topology::{validate, DeviceSpec, RngSpec, VhostUserSpec};
/// use switchboard_runtime::DeviceId;
///
/// let rng = |id: &str| DeviceSpec::VirtioRng(RngSpec {
///     id: DeviceId::new(id),
///     rate_limit: None,
///     vhost_user: VhostUserSpec::new(PathBuf::from("/nonexistent/rng.sock"), 1),
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
/// use switchboard_devices::host::topology::{check_device_against, check_str, parse_device};
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
pub(super) struct Claims {
    /// Sockets and output files: one device each. (field, what, file)
    pub(super) exclusive: Vec<(&'static str, &'static str, PathBuf)>,
    /// A disk image and whether it is served read-only.
    pub(super) image: Option<(PathBuf, bool)>,
}

impl Claims {
    pub(super) fn of(device: &DeviceSpec) -> Claims {
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
pub(super) fn identity(path: &Path) -> PathBuf {
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
pub(super) fn label(id: &DeviceId, at: Option<&JsonPath>) -> String {
    match at {
        Some(p) => format!("device `{id}` ({p})"),
        None => format!("device `{id}`"),
    }
}

pub(super) fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// The semantic checks; collects findings.
pub(super) struct Checker<'a> {
    pub(super) buses: HashMap<&'a str, &'a BusSpec>,
    pub(super) bus_order: Vec<&'a str>,
    pub(super) unparsed_bus_ids: &'a HashSet<String>,
    pub(super) out: Vec<Finding>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(
        buses: &[(JsonPath, &'a BusSpec)],
        unparsed_bus_ids: &'a HashSet<String>,
    ) -> Self {
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

    pub(super) fn push(&mut self, path: JsonPath, message: String) {
        self.out.push(Finding::at(path, message));
    }

    /// Checks a whole topology (or what could be read of it).
    pub(super) fn check_all(
        &mut self,
        buses: &[(JsonPath, &BusSpec)],
        devices: &[(JsonPath, &DeviceSpec)],
    ) {
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
    pub(super) fn check_id<'i>(
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

    pub(super) fn check_bus(&mut self, at: &JsonPath, bus: &BusSpec) {
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

    pub(super) fn check_device(&mut self, at: &JsonPath, device: &DeviceSpec) {
        // The file-system checks around the kind's own ones, in the order
        // of the fields.
        if let DeviceSpec::VirtioBlk(d) = device {
            self.check_image(&at.key("path"), &d.path, d.read_only);
        }
        for invalid in device.validate() {
            self.push(at.join(&JsonPath::parse(invalid.field)), invalid.message);
        }
        if let Some(vhost_user) = device.vhost_user() {
            self.check_socket(&at.key("vhost_user").key("socket"), &vhost_user.socket);
        }
        if let DeviceSpec::Uart16550(d) = device {
            match &d.output {
                Output::File(p) => self.check_output_file(&at.key("output"), p),
                Output::Unix(p) => self.check_socket(&at.key("output"), p),
                Output::Null | Output::Stdout | Output::Stdio => {}
            }
        }
        if let Some(place) = device.placement() {
            self.check_placement(at, device, &place);
        }
    }

    pub(super) fn check_placement(
        &mut self,
        at: &JsonPath,
        device: &DeviceSpec,
        place: &Placement<'_>,
    ) {
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

    pub(super) fn check_image(&mut self, at: &JsonPath, path: &Path, read_only: bool) {
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

    pub(super) fn check_socket(&mut self, at: &JsonPath, path: &Path) {
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

    pub(super) fn check_output_file(&mut self, at: &JsonPath, path: &Path) {
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
    pub(super) fn check_pair(
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
