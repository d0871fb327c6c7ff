// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The decoders of text a VMM's operator or a file gives the process: the
//! topology JSON and its checker, control-socket request lines, and the
//! message log.

use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Map, Value};
use switchboard_devices::host::control::{handle_line, BusAccessRequest, CommandError, Controller};
use switchboard_devices::host::topology::{
    check_device_against, check_str, parse_device, BusSpec, DeviceSpec,
};
use switchboard_devices::log::inspect::{inspect, InspectOptions};
use switchboard_devices::log::replay::{replay, ReplayOptions};
use switchboard_runtime::recording::{LogReader, RecordKind};

use super::wait_for_threads_named;

/// Where relative paths in fuzzed topologies and devices are taken from:
/// an empty directory of this process's own, so that the checker finds
/// the same (nothing) from one run to the next.
fn base_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a base directory"))
        .path()
}

/// The name `replay` gives the thread that reads the log ahead.
const REPLAY_READER: &str = "replay-reader";

/// Most records a log input is read for (a log input is at most a few
/// thousand lines anyway).
const MAX_RECORDS: usize = 10_000;

/// A topology file's text into [`check_str`]: a topology it accepts has
/// devices with distinct ids, each of which [`parse_device`] reads back
/// from its own JSON form alone.
pub fn fuzz_topology(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match check_str(text, base_dir()) {
        Ok(topology) => {
            let mut ids: Vec<&str> = topology.devices.iter().map(|d| d.id().as_str()).collect();
            ids.sort_unstable();
            let n = ids.len();
            ids.dedup();
            assert_eq!(ids.len(), n, "an accepted topology has duplicate ids");
        }
        Err(diagnostics) => {
            assert!(!diagnostics.is_empty(), "refused with no diagnostic");
            for d in &diagnostics {
                // Every diagnostic formats (names a path and a message).
                let _ = d.to_string();
            }
        }
    }
}

/// The buses and running devices the fuzzed control lines meet: those of
/// `examples/topologies/mmio-pio.json`'s shape, checked once.
fn fleet() -> &'static (Vec<BusSpec>, Vec<DeviceSpec>) {
    static FLEET: OnceLock<(Vec<BusSpec>, Vec<DeviceSpec>)> = OnceLock::new();
    FLEET.get_or_init(|| {
        let topology = check_str(
            r#"{ "buses": [ { "id": "pio0", "kind": "pio" },
                           { "id": "mmio0", "kind": "mmio", "size": "0x100000000" } ],
                 "devices": [
                   { "id": "com1", "kind": "uart-16550", "bus": "pio0",
                     "addr": "0x3f8", "output": "null" },
                   { "id": "slow0", "kind": "test-device", "bus": "mmio0",
                     "addr": "0xd0000000" },
                   { "id": "rng0", "kind": "virtio-rng",
                     "vhost_user": { "socket": "rng0.sock" } } ] }"#,
            base_dir(),
        )
        .unwrap_or_else(|e| panic!("the fuzzing fleet's topology: {e:?}"));
        (topology.buses, topology.devices)
    })
}

/// A controller that decodes every command as `switchboard run`'s runner
/// does, and runs none: what a line can reach before anything acts on it.
#[derive(Debug)]
struct Decoding;

impl Controller for Decoding {
    fn execute(
        &self,
        command: &str,
        arguments: &Map<String, Value>,
    ) -> Result<Value, CommandError> {
        let (buses, running) = fleet();
        match command {
            "device-add" => {
                let spec = parse_device(&Value::Object(arguments.clone()), "", base_dir())
                    .map_err(|d| CommandError::generic(format!("{d:?}")))?;
                let errors = check_device_against(buses, running, &spec, "");
                if errors.is_empty() {
                    Ok(json!({ "id": spec.id().as_str() }))
                } else {
                    Err(CommandError::generic(format!("{errors:?}")))
                }
            }
            "bus-read" | "bus-write" => {
                let request = BusAccessRequest::parse(command, arguments)?;
                let bus = buses
                    .iter()
                    .find(|b| b.id().as_str() == request.bus)
                    .ok_or_else(|| CommandError::generic(format!("{request}: no such bus")))?;
                request.check_within(bus.size())?;
                let end = u128::from(request.addr.0) + u128::from(request.size.bytes());
                assert!(end <= bus.size(), "{request} passed the bus's end");
                Ok(json!(request.to_string()))
            }
            "device-del" | "query-devices" | "query-stats" | "query-failures" => Ok(json!({})),
            other => Err(CommandError::command_not_found(other)),
        }
    }

    fn commands(&self) -> Vec<&'static str> {
        vec![
            "query-devices",
            "device-add",
            "device-del",
            "query-stats",
            "query-failures",
            "bus-read",
            "bus-write",
        ]
    }
}

/// Control-socket input: each line through [`handle_line`] (with a
/// controller that decodes as the runner does, and runs nothing), whose
/// answer must be one `return` or one `error` object; and each line's
/// words through [`BusAccessRequest::shorthand`], as `switchboard ctl`
/// reads its command line.
pub fn fuzz_control_line(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let reply = handle_line(line.trim(), &Decoding);
        let reply = reply.as_object().expect("a reply is a JSON object");
        assert!(
            reply.contains_key("return") != reply.contains_key("error"),
            "a reply is a return or an error: {reply:?}"
        );
        let mut words = line.split_whitespace().map(str::to_string);
        if let Some(command) = words.next() {
            let words: Vec<String> = words.collect();
            if let Some(Ok(arguments)) = BusAccessRequest::shorthand(&command, &words) {
                let arguments = arguments.as_object().expect("shorthand makes an object");
                let _ = BusAccessRequest::parse(&command, arguments);
            }
        }
    }
}

/// A message-log file: read with [`LogReader`] (header, then every line
/// parsed as a record, its type named), then through `switchboard log`'s
/// [`inspect`] (listing and latency table) and `switchboard replay`'s
/// [`replay`]. Every one of them must return, an error or not.
pub fn fuzz_log_reader(data: &[u8]) {
    thread_local! {
        static FILE: tempfile::NamedTempFile =
            tempfile::NamedTempFile::new().expect("a temporary log file");
    }
    FILE.with(|file| {
        let path = file.path();
        {
            let mut f = std::fs::File::create(path).expect("rewrite the log file");
            f.write_all(data).expect("write the log file");
        }
        if let Ok(mut reader) = LogReader::open(path) {
            let _ = reader.header();
            for _ in 0..MAX_RECORDS {
                let line = reader.line() + 1;
                match reader.next_line() {
                    Ok(Some(text)) => {
                        if let Ok(record) = LogReader::parse(path, line, text) {
                            let _ = RecordKind::parse(&record.kind);
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let mut out = Vec::new();
        let _ = inspect(path, &InspectOptions::default(), &mut out);
        let stats = InspectOptions {
            stats: true,
            ..InspectOptions::default()
        };
        out.clear();
        let _ = inspect(path, &stats, &mut out);
        let _ = replay(path, &ReplayOptions::default());
        // `replay` returns once its reader thread has sent the last lines,
        // and leaves the thread to end on its own (LeakSanitizer took one
        // ending during the next input for a leak of its thread-local
        // destructor list).
        wait_for_threads_named(REPLAY_READER, Duration::from_secs(10));
    });
}
