// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Reading a topology: syntax, then the shape of each bus and device.

use super::*;

/// Reads and checks the topology file at `path`; relative paths in it are
/// taken from `path`'s directory. Returns the topology, or every error found
/// (one if the file cannot be read).
///
/// ```
/// use switchboard_devices::host::topology::check_file;
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
/// use switchboard_devices::host::topology::check_str;
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
/// use switchboard_devices::host::topology::parse_device;
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
pub(super) struct Parsed {
    pub(super) buses: Vec<(JsonPath, BusSpec)>,
    pub(super) devices: Vec<(JsonPath, DeviceSpec)>,
    /// The ids of buses that could not be read: devices on them are not
    /// reported as being on an unknown bus.
    pub(super) unparsed_bus_ids: HashSet<String>,
    /// Whether the document had a usable top level.
    pub(super) complete: bool,
}

pub(super) fn parse_topology(value: &Value, base_dir: &Path, out: &mut Vec<Finding>) -> Parsed {
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

pub(super) fn parse_device_at(
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
    let Ok(kind) = kind.parse::<DeviceKind>() else {
        out.push(Finding::at(
            at.key("kind"),
            format!("unknown kind `{kind}`, expected one of {}", kinds_list()),
        ));
        return None;
    };
    let k = Some(kind);
    let mut device =
        each_kind!(kind, T => deserialize_collecting::<T>(rest, at, k, out).map(DeviceSpec::from))?;
    device.resolve_paths(base_dir);
    Some(device)
}

/// Most errors reported for one bus or device.
pub(super) const MAX_ERRORS_PER_OBJECT: usize = 16;

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
pub(super) fn deserialize_collecting<T: DeserializeOwned>(
    mut value: Value,
    at: &JsonPath,
    kind: Option<DeviceKind>,
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
pub(super) fn remove(value: &mut Value, path: &JsonPath) -> bool {
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
pub(super) fn explain(kind: Option<DeviceKind>, rel: &JsonPath, message: String) -> String {
    let Some(kind) = kind else { return message };
    let field = match rel.0.as_slice() {
        [Seg::Key(k)] => Some(k.as_str()),
        _ => None,
    };
    let vhost_user = kind.is_vhost_user();
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
