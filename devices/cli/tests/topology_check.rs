// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard check` as an operator runs it: every example topology
//! passes, and each malformed topology exits 2 naming the JSON path (and,
//! where it matters, the line and column) of every error.
//!
//! Each malformed topology is written as `topology.json` into a fresh
//! directory that holds the files the topologies refer to by relative path
//! (see [`Fixture`]), so the file-system checks run against known files.

use std::fs;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

fn switchboard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
}

/// What `switchboard check` did.
struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run_check(file: &Path) -> Checked {
    let out = switchboard()
        .arg("check")
        .arg(file)
        .output()
        .expect("run switchboard check");
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A directory with the files the topologies name:
///
/// - `disk.img`: a 1 MiB raw image; `small.img`: 100 bytes, less than a sector;
/// - `adir/`: a directory; `run/`: a directory for sockets;
/// - `notasock`: a regular file where a socket is expected.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        fs::File::create(p.join("disk.img"))
            .and_then(|f| f.set_len(1 << 20))
            .expect("create disk.img");
        fs::write(p.join("small.img"), [0u8; 100]).expect("create small.img");
        fs::create_dir(p.join("adir")).expect("create adir");
        fs::create_dir(p.join("run")).expect("create run");
        fs::write(p.join("notasock"), b"not a socket").expect("create notasock");
        Fixture { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn check(&self, json: &str) -> Checked {
        let file = self.path().join("topology.json");
        fs::write(&file, json).expect("write topology.json");
        run_check(&file)
    }
}

/// Checks `json` in a fresh [`Fixture`] and asserts exit status 2 and one
/// diagnostic line per entry of `want`, each line containing every fragment
/// of its entry, in order.
fn assert_invalid(json: &str, want: &[&[&str]]) {
    assert_invalid_in(&Fixture::new(), json, want);
}

fn assert_invalid_in(fixture: &Fixture, json: &str, want: &[&[&str]]) {
    let out = fixture.check(json);
    assert_eq!(
        out.code,
        Some(2),
        "exit status for\n{json}\nstdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    let file = fixture.path().join("topology.json");
    let prefix = file.to_string_lossy();
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with(&*prefix))
        .collect();
    assert_eq!(
        lines.len(),
        want.len(),
        "number of errors for\n{json}\nstderr:\n{}",
        out.stderr
    );
    for (line, fragments) in lines.iter().zip(want) {
        for fragment in *fragments {
            assert!(
                line.contains(fragment),
                "expected {fragment:?} in {line:?}\nfor\n{json}\nstderr:\n{}",
                out.stderr
            );
        }
    }
    let summary = format!("switchboard: error: {prefix}: {} error", want.len());
    assert!(out.stderr.contains(&summary), "stderr:\n{}", out.stderr);
}

/// One test per malformed topology: `name: json => [[fragments of the first
/// error line], ...];`.
macro_rules! invalid {
    ($($name:ident: $json:expr => [$([$($frag:expr),+ $(,)?]),+ $(,)?];)+) => {
        $(
            #[test]
            fn $name() {
                assert_invalid($json, &[$(&[$($frag),+]),+]);
            }
        )+
    };
}

// ---------------------------------------------------------------------------
// JSON syntax: one error, with serde_json's line and column and the path of
// the object or array it is in.
// ---------------------------------------------------------------------------

invalid! {
    test_syntax_trailing_comma_in_array: r#"{
  "devices": [
    { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock" } },
  ]
}"# => [["topology.json:4:3: devices[1]: invalid JSON: trailing comma"]];

    test_syntax_trailing_comma_in_object: r#"{
  "devices": [
    { "id": "rng0", "kind": "virtio-rng",
      "vhost_user": { "socket": "rng0.sock" }, }
  ]
}"# => [["topology.json:4:48: devices[0]: invalid JSON: trailing comma"]];

    test_syntax_truncated_file: r#"{
  "devices": [
    { "id": "rng0", "kind": "virtio-rng",
      "vhost_user": { "socket": "rng0.sock""# => [[
        "topology.json:4:43: devices[0].vhost_user: invalid JSON: EOF while parsing an object"
    ]];

    test_syntax_empty_file: "" => [["topology.json:1:1: invalid JSON: EOF while parsing a value"]];

    test_syntax_unquoted_key: "{ devices: [] }" => [["topology.json:1:3: invalid JSON: key must be a string"]];

    test_syntax_missing_comma_between_devices: r#"{
  "devices": [
    { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock" } }
    { "id": "rng1", "kind": "virtio-rng", "vhost_user": { "socket": "rng1.sock" } }
  ]
}"# => [["topology.json:4:5: devices: invalid JSON: expected `,` or `]`"]];

    test_syntax_single_quotes: r#"{ "devices": [ { 'id': 'rng0' } ] }"# => [[
        "topology.json:1:18: devices[0]: invalid JSON: key must be a string"
    ]];

    test_syntax_comment: "// my VM\n{ \"devices\": [] }" => [["topology.json:1:1: invalid JSON: expected value"]];
}

// ---------------------------------------------------------------------------
// Types and values.
// ---------------------------------------------------------------------------

invalid! {
    test_type_top_level_is_an_array: "[]" => [["topology.json:1:1: expected a topology object"]];

    test_type_devices_is_an_object: r#"{ "devices": {} }"# => [[
        "topology.json:1:14: devices: expected an array of devices, found an object"
    ]];

    test_type_buses_is_a_string: r#"{ "buses": "pio0", "devices": [] }"# => [[
        "topology.json:1:12: buses: expected an array of buses, found string \"pio0\""
    ]];

    test_type_device_is_a_string: r#"{ "devices": [ "rng0" ] }"# => [[
        "topology.json:1:16: devices[0]: expected a device object with a `kind`"
    ]];

    test_type_kind_is_a_number: r#"{ "devices": [ { "id": "x", "kind": 7 } ] }"# => [[
        "topology.json:1:37: devices[0].kind: invalid type: number `7`, expected a device kind"
    ]];

    test_type_read_only_is_a_string: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "disk.img", "read_only": "yes",
    "vhost_user": { "socket": "disk0.sock" } } ] }"# => [[
        "topology.json:2:75: devices[0].read_only: invalid type: string \"yes\", expected a boolean"
    ]];

    test_type_queues_is_a_word: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "disk.img",
    "vhost_user": { "socket": "disk0.sock", "queues": "two" } } ] }"# => [[
        "topology.json:3:55: devices[0].vhost_user.queues: invalid value: string \"two\", expected an integer from 0 to 65535"
    ]];

    test_type_queues_is_negative: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "disk.img",
    "vhost_user": { "socket": "disk0.sock", "queues": -1 } } ] }"# => [[
        "devices[0].vhost_user.queues: invalid value: integer `-1`, expected an integer"
    ]];

    test_type_queues_is_fractional: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "disk.img",
    "vhost_user": { "socket": "disk0.sock", "queues": 1.5 } } ] }"# => [[
        "devices[0].vhost_user.queues: invalid type: floating point `1.5`, expected an integer"
    ]];

    test_type_queues_overflows_u16: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "disk.img",
    "vhost_user": { "socket": "disk0.sock", "queues": 70000 } } ] }"# => [[
        "devices[0].vhost_user.queues: invalid value: integer `70000`, expected an integer from 0 to 65535"
    ]];

    test_type_addr_is_a_boolean: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": true, "output": "null" } ] }"# => [[
        "topology.json:2:64: devices[0].addr: invalid type: boolean `true`, expected an integer"
    ]];

    test_type_addr_bad_hex: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": "0x3g8", "output": "null" } ] }"# => [[
        "devices[0].addr: invalid value: string \"0x3g8\", expected an integer"
    ]];

    test_type_addr_empty_hex: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": "0x", "output": "null" } ] }"# => [[
        "devices[0].addr: invalid value: string \"0x\", expected an integer"
    ]];

    test_type_id_is_a_number: r#"{ "devices": [
  { "id": 5, "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock" } } ] }"# => [[
        "topology.json:2:11: devices[0].id: invalid type: integer `5`, expected an id"
    ]];

    test_type_id_has_a_space: r#"{ "devices": [
  { "id": "rng 0", "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock" } } ] }"# => [[
        "devices[0].id: invalid value: string \"rng 0\", expected an id"
    ]];

    test_type_socket_is_a_number: r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": 3 } } ] }"# => [[
        "topology.json:2:67: devices[0].vhost_user.socket: invalid type: integer `3`, expected path string"
    ]];

    test_type_output_unknown: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": 1016, "output": "tty" } ] }"# => [[
        "devices[0].output: invalid value: string \"tty\", expected an output: \"stdout\""
    ]];

    test_type_bus_kind_unknown: r#"{ "buses": [ { "id": "isa0", "kind": "isa" } ], "devices": [] }"# => [[
        "topology.json:1:38: buses[0].kind: unknown variant `isa`, expected `pio` or `mmio`"
    ]];
}

// ---------------------------------------------------------------------------
// Unknown, duplicate and missing fields.
// ---------------------------------------------------------------------------

invalid! {
    test_unknown_field_at_top_level: r#"{ "machine": "q35", "devices": [] }"# => [[
        "topology.json:1:3: machine: unknown field `machine`, expected `buses` or `devices`"
    ]];

    test_unknown_field_in_device: r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "size": 4, "vhost_user": { "socket": "rng0.sock" } } ] }"# => [[
        "topology.json:2:41: devices[0].size: unknown field `size`, expected one of `id`, `rate_limit`, `vhost_user`"
    ]];

    test_unknown_field_in_vhost_user: r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng",
    "vhost_user": { "socket": "rng0.sock", "queue": 1 } } ] }"# => [[
        "topology.json:3:44: devices[0].vhost_user.queue: unknown field `queue`, expected one of `socket`, `queues`, `restart`"
    ]];

    test_unknown_field_in_bus: r#"{ "buses": [ { "id": "pio0", "kind": "pio", "base": 0 } ], "devices": [] }"# => [[
        "buses[0].base: unknown field `base`"
    ]];

    test_unknown_field_bus_on_a_vhost_user_device: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "rng0", "kind": "virtio-rng", "bus": "pio0", "vhost_user": { "socket": "rng0.sock" } } ] }"# => [[
        "devices[0].bus: unknown field `bus`: a virtio-rng is served over vhost-user and sits on no bus"
    ]];

    test_unknown_kind: r#"{ "devices": [
  { "id": "net0", "kind": "virtio-net", "vhost_user": { "socket": "net0.sock" } } ] }"# => [[
        "topology.json:2:27: devices[0].kind: unknown kind `virtio-net`, expected one of `virtio-blk`"
    ]];

    test_duplicate_key_in_one_object: r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "id": "rng1", "vhost_user": { "socket": "rng0.sock" } } ] }"# => [[
        "topology.json:2:41: devices[0].id: duplicate key `id`"
    ]];

    test_missing_kind: r#"{ "devices": [ { "id": "rng0", "vhost_user": { "socket": "rng0.sock" } } ] }"# => [[
        "topology.json:1:16: devices[0]: missing field `kind`, expected one of"
    ]];

    test_missing_devices: r#"{ "buses": [] }"# => [["topology.json:1:1: missing field `devices`"]];

    test_missing_image_path: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "vhost_user": { "socket": "disk0.sock" } } ] }"# => [[
        "topology.json:2:3: devices[0]: missing field `path`"
    ]];

    test_missing_socket: r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "queues": 1 } } ] }"# => [[
        "topology.json:2:55: devices[0].vhost_user: missing field `socket`"
    ]];

    test_missing_bus_on_a_uart: r#"{ "devices": [
  { "id": "com1", "kind": "uart-16550", "addr": "0x3f8", "output": "null" } ] }"# => [[
        "devices[0]: missing field `bus`: a uart-16550 has a register region"
    ]];
}

// ---------------------------------------------------------------------------
// Meaning: what the types cannot express.
// ---------------------------------------------------------------------------

invalid! {
    test_semantic_duplicate_device_ids: r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock" } },
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "rng1.sock" } } ] }"# => [[
        "topology.json:3:11: devices[1].id: duplicate id `rng0`: already the id of device `rng0` (devices[0])"
    ]];

    test_semantic_device_id_equals_a_bus_id: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "pio0", "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock" } } ] }"# => [[
        "devices[0].id: duplicate id `pio0`: already the id of bus `pio0` (buses[0])"
    ]];

    test_semantic_duplicate_bus_ids: r#"{ "buses": [ { "id": "pio0", "kind": "pio" }, { "id": "pio0", "kind": "mmio" } ],
  "devices": [] }"# => [["topology.json:1:55: buses[1].id: duplicate id `pio0`"]];

    test_semantic_unknown_bus: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "com1", "kind": "uart-16550", "bus": "pio1", "addr": "0x3f8", "output": "null" } ] }"# => [[
        "topology.json:2:48: devices[0].bus: unknown bus `pio1`, expected one of `pio0`"
    ]];

    test_semantic_bus_device_without_any_bus: r#"{ "devices": [
  { "id": "slow0", "kind": "test-device", "bus": "mmio0", "addr": 0 } ] }"# => [[
        "devices[0].bus: unknown bus `mmio0`: the topology has no `buses`"
    ]];

    test_semantic_overlapping_regions: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": "0x3f8", "output": "null" },
  { "id": "slow0", "kind": "test-device", "bus": "pio0", "addr": "0x3e0" } ] }"# => [[
        "topology.json:3:66: devices[1].addr: region 0x3e0..0x400 of `slow0` overlaps device `com1` (devices[0]) at 0x3f8..0x400 on bus `pio0`"
    ]];

    test_semantic_region_beyond_the_pio_bus: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": "0xfffc", "output": "null" } ] }"# => [[
        "devices[0].addr: the 8-byte region of uart-16550 `com1` at 0xfffc ends beyond bus `pio0` (0x10000 bytes): expected an address from 0x0 to 0xfff8"
    ]];

    test_semantic_region_beyond_a_sized_mmio_bus: r#"{ "buses": [ { "id": "mmio0", "kind": "mmio", "size": "0x1000" } ], "devices": [
  { "id": "slow0", "kind": "test-device", "bus": "mmio0", "addr": 4096 } ] }"# => [[
        "devices[0].addr: the 32-byte region of test-device `slow0` at 0x1000 ends beyond bus `mmio0`"
    ]];

    test_semantic_pio_bus_too_large: r#"{ "buses": [ { "id": "pio0", "kind": "pio", "size": "0x20000" } ], "devices": [] }"# => [[
        "topology.json:1:53: buses[0].size: expected a PIO bus size of at most 0x10000 (64 KiB), found 0x20000"
    ]];

    test_semantic_bus_size_zero: r#"{ "buses": [ { "id": "mmio0", "kind": "mmio", "size": 0 } ], "devices": [] }"# => [[
        "buses[0].size: expected a bus size of at least 1, found 0"
    ]];

    test_semantic_image_missing: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "missing.img",
    "vhost_user": { "socket": "disk0.sock" } } ] }"# => [[
        "topology.json:2:50: devices[0].path: image ", "missing.img does not exist"
    ]];

    test_semantic_image_is_a_directory: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "adir", "vhost_user": { "socket": "disk0.sock" } } ] }"# => [[
        "devices[0].path: image ", "adir is not a regular file"
    ]];

    test_semantic_image_smaller_than_a_sector: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "small.img", "vhost_user": { "socket": "disk0.sock" } } ] }"# => [[
        "devices[0].path: image ", "small.img is 100 bytes; expected at least one 512-byte sector"
    ]];

    test_semantic_socket_path_is_a_regular_file: r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "notasock" } } ] }"# => [[
        "topology.json:2:67: devices[0].vhost_user.socket: ", "notasock exists and is not a socket"
    ]];

    test_semantic_socket_directory_missing: r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "nodir/rng0.sock" } } ] }"# => [[
        "devices[0].vhost_user.socket: directory ", "nodir of socket ", "does not exist"
    ]];

    test_semantic_socket_path_too_long: concat!(r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "/tmp/"#,
  "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
  r#".sock" } } ] }"#) => [[
        "devices[0].vhost_user.socket: socket path /tmp/aaa", "is 118 bytes; expected at most 107"
    ]];

    test_semantic_two_devices_on_one_socket: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "disk.img", "vhost_user": { "socket": "run/vm.sock" } },
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "run/../run/vm.sock" } } ] }"# => [[
        "topology.json:3:67: devices[1].vhost_user.socket: socket ", "vm.sock is also the socket of device `disk0` (devices[0])"
    ]];

    test_semantic_uart_output_on_a_device_socket: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "run/vm.sock" } },
  { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": "0x3f8", "output": "unix:run/vm.sock" } ] }"# => [[
        "devices[1].output: socket ", "is also the socket of device `rng0` (devices[0])"
    ]];

    test_semantic_output_file_directory_missing: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": "0x3f8", "output": "file:logs/com1.log" } ] }"# => [[
        "devices[0].output: directory ", "logs of output file ", "does not exist"
    ]];

    test_semantic_output_file_is_a_directory: r#"{ "buses": [ { "id": "pio0", "kind": "pio" } ], "devices": [
  { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": "0x3f8", "output": "file:adir" } ] }"# => [[
        "devices[0].output: output file ", "adir is a directory"
    ]];

    test_semantic_queues_zero: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "disk.img",
    "vhost_user": { "socket": "disk0.sock", "queues": 0 } } ] }"# => [[
        "topology.json:3:55: devices[0].vhost_user.queues: expected 1 to 64 queues for a virtio-blk, found 0"
    ]];

    test_semantic_queues_above_64: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "disk.img",
    "vhost_user": { "socket": "disk0.sock", "queues": "0x41" } } ] }"# => [[
        "devices[0].vhost_user.queues: expected 1 to 64 queues for a virtio-blk, found 65"
    ]];

    test_semantic_rng_with_two_queues: r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock", "queues": 2 } } ] }"# => [[
        "devices[0].vhost_user.queues: expected 1 queue (a virtio-rng has one request queue), found 2"
    ]];

    test_semantic_serial_too_long: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "disk.img", "serial": "0123456789abcdefghijk",
    "vhost_user": { "socket": "disk0.sock" } } ] }"# => [[
        "topology.json:2:72: devices[0].serial: expected a serial of at most 20 bytes, found 21 bytes"
    ]];

    test_semantic_rate_limit_zero: r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "rate_limit": "0x0", "vhost_user": { "socket": "rng0.sock" } } ] }"# => [[
        "devices[0].rate_limit: expected a rate limit of at least 1 byte per second"
    ]];

    test_semantic_writable_disks_share_an_image: r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "disk.img", "read_only": true,
    "vhost_user": { "socket": "disk0.sock" } },
  { "id": "disk1", "kind": "virtio-blk", "path": "./disk.img", "vhost_user": { "socket": "disk1.sock" } } ] }"# => [[
        "topology.json:4:50: devices[1].path: image ", "disk.img is also served by device `disk0` (devices[0]); expected devices to share an image only when all of them are read-only"
    ]];
}

// ---------------------------------------------------------------------------
// Cases that need more than a static text.
// ---------------------------------------------------------------------------

#[test]
fn test_semantic_socket_in_use() {
    let fixture = Fixture::new();
    let _listener = UnixListener::bind(fixture.path().join("busy.sock")).expect("bind");
    assert_invalid_in(
        &fixture,
        r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "busy.sock" } } ] }"#,
        &[&[
            "devices[0].vhost_user.socket: ",
            "busy.sock is a socket another process is listening on",
        ]],
    );
}

#[test]
fn test_semantic_stale_socket_is_accepted() {
    let fixture = Fixture::new();
    drop(UnixListener::bind(fixture.path().join("stale.sock")).expect("bind"));
    let out = fixture.check(
        r#"{ "devices": [
  { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "stale.sock" } } ] }"#,
    );
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
}

/// A file this process cannot open for reading. Root reads any file whatever
/// its mode, so as root this is a sysfs attribute without read permission
/// (sysfs refuses to open those for reading even for root); None if there is
/// none.
fn unreadable_file(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join("secret.img");
    fs::File::create(&file)
        .and_then(|f| f.set_len(1 << 20))
        .expect("create");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o000)).expect("chmod");
    if fs::File::open(&file).is_err() {
        return Some(file);
    }
    fs::read_dir("/sys/bus")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("drivers_probe"))
        .find(|p| {
            fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o444 == 0)
                && fs::File::open(p).is_err()
        })
}

/// A readable file this process cannot open for writing: mode 0444, or as
/// root a read-only sysfs attribute (sysfs refuses to open those for
/// writing even for root). Opening is all the check does; nothing is written.
fn unwritable_file(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join("readonly.img");
    fs::File::create(&file)
        .and_then(|f| f.set_len(1 << 20))
        .expect("create");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o444)).expect("chmod");
    let unwritable =
        |p: &Path| fs::File::open(p).is_ok() && fs::OpenOptions::new().write(true).open(p).is_err();
    if unwritable(&file) {
        return Some(file);
    }
    [
        "/sys/devices/system/cpu/possible",
        "/sys/devices/system/cpu/online",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() >= 512) && unwritable(p))
}

#[test]
fn test_semantic_read_only_image_unreadable() {
    let fixture = Fixture::new();
    let Some(image) = unreadable_file(fixture.path()) else {
        eprintln!("skipped: no file here is unreadable to this process");
        return;
    };
    let json = format!(
        r#"{{ "devices": [
  {{ "id": "disk0", "kind": "virtio-blk", "path": {}, "read_only": true,
    "vhost_user": {{ "socket": "disk0.sock" }} }} ] }}"#,
        serde_json::to_string(&image).expect("path as JSON")
    );
    assert_invalid_in(
        &fixture,
        &json,
        &[&[
            "topology.json:2:50: devices[0].path: image ",
            "cannot be opened for reading (permission denied); expected a readable file",
        ]],
    );
}

#[test]
fn test_semantic_writable_image_not_writable() {
    let fixture = Fixture::new();
    let Some(image) = unwritable_file(fixture.path()) else {
        eprintln!("skipped: no readable file here is unwritable to this process");
        return;
    };
    let json = format!(
        r#"{{ "devices": [
  {{ "id": "disk0", "kind": "virtio-blk", "path": {},
    "vhost_user": {{ "socket": "disk0.sock" }} }} ] }}"#,
        serde_json::to_string(&image).expect("path as JSON")
    );
    assert_invalid_in(
        &fixture,
        &json,
        &[&[
            "devices[0].path: image ",
            "cannot be opened for writing (permission denied); expected a writable file, or \"read_only\": true",
        ]],
    );
    // The same image served read-only is fine.
    let out = fixture.check(&json.replace(r#""path""#, r#""read_only": true, "path""#));
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
}

#[test]
fn test_three_independent_errors_are_all_reported() {
    assert_invalid(
        r#"{
  "buses": [ { "id": "pio0", "kind": "pio" } ],
  "devices": [
    { "id": "disk0", "kind": "virtio-blk", "path": "disk.img",
      "vhost_user": { "socket": "disk0.sock", "queues": "many" } },
    { "id": "com1", "kind": "uart-16550", "bus": "pio9", "addr": "0x3f8", "output": "null" },
    { "id": "rng0", "kind": "virtio-rng", "vhost_user": { "socket": "rng0.sock" }, "entropy": "max" }
  ]
}"#,
        &[
            &["topology.json:5:57: devices[0].vhost_user.queues: invalid value"],
            &["topology.json:6:50: devices[1].bus: unknown bus `pio9`"],
            &["topology.json:7:84: devices[2].entropy: unknown field `entropy`"],
        ],
    );
}

#[test]
fn test_errors_of_every_stage_are_reported_together() {
    // A shape error in one device does not hide a semantic error in another,
    // and two shape errors in one device are both reported.
    assert_invalid(
        r#"{ "devices": [
  { "id": "disk0", "kind": "virtio-blk", "path": "disk.img", "read_only": 1, "serial": 2,
    "vhost_user": { "socket": "disk0.sock" } },
  { "id": "disk1", "kind": "virtio-blk", "path": "missing.img", "vhost_user": { "socket": "disk1.sock" } } ] }"#,
        &[
            &["devices[0].read_only: invalid type"],
            &["devices[0].serial: invalid type"],
            &["devices[1].path: image ", "missing.img does not exist"],
        ],
    );
}

#[test]
fn test_fixture_topology_with_every_kind_is_valid() {
    let fixture = Fixture::new();
    let out = fixture.check(
        r#"{ "buses": [ { "id": "pio0", "kind": "pio" }, { "id": "mmio0", "kind": "mmio" } ],
  "devices": [
    { "id": "disk0", "kind": "virtio-blk", "path": "disk.img", "serial": "01234567890123456789",
      "vhost_user": { "socket": "run/disk0.sock", "queues": 64 } },
    { "id": "rng0", "kind": "virtio-rng", "rate_limit": "1024", "vhost_user": { "socket": "run/rng0.sock" } },
    { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": "0xfff8", "output": "unix:run/com1.sock" },
    { "id": "com2", "kind": "uart-16550", "bus": "pio0", "addr": 0, "output": "file:run/com2.log" },
    { "id": "slow0", "kind": "test-device", "bus": "mmio0", "addr": "0x8", "read_delay_us": 10 }
  ] }"#,
    );
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(
        out.stdout
            .ends_with("topology.json: 5 devices on 2 buses: OK\n"),
        "stdout: {}",
        out.stdout
    );
    assert!(
        !fixture.path().join("run/com2.log").exists(),
        "check created a file"
    );
}

#[test]
fn test_unreadable_topology_file_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_check(&dir.path().join("nope.json"));
    assert_eq!(out.code, Some(2), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("nope.json: cannot read "),
        "stderr: {}",
        out.stderr
    );
}

#[test]
fn test_check_help_explains_exit_codes() {
    let out = switchboard()
        .args(["check", "--help"])
        .output()
        .expect("run switchboard");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for fragment in ["exits 2", "FILE:LINE:COLUMN: JSON.PATH", "FILE's directory"] {
        assert!(text.contains(fragment), "{fragment:?} not in:\n{text}");
    }
}

// ---------------------------------------------------------------------------
// The examples.
// ---------------------------------------------------------------------------

/// Copies `examples/topologies/` into a temporary directory and creates the
/// images its blk devices name (1 MiB, sparse), as a later `run` would.
fn examples_with_images() -> (tempfile::TempDir, Vec<PathBuf>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/topologies");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for entry in fs::read_dir(&src).expect("read examples/topologies") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let to = dir.path().join(path.file_name().expect("a file name"));
        fs::copy(&path, &to).expect("copy");
        let text = fs::read_to_string(&to).expect("read");
        let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let devices = value["devices"].as_array().expect("devices");
        for image in devices.iter().filter_map(|d| d["path"].as_str()) {
            let image = dir.path().join(image);
            fs::File::create(&image)
                .and_then(|f| f.set_len(1 << 20))
                .expect("create image");
        }
        files.push(to);
    }
    files.sort();
    (dir, files)
}

#[test]
fn test_every_example_validates() {
    let (_dir, files) = examples_with_images();
    let names: Vec<_> = files
        .iter()
        .filter_map(|f| f.file_name()?.to_str().map(str::to_owned))
        .collect();
    for want in ["blk-rng.json", "disks.json", "mmio-pio.json"] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    for file in &files {
        let out = run_check(file);
        assert_eq!(
            out.code,
            Some(0),
            "{}: stderr:\n{}",
            file.display(),
            out.stderr
        );
        assert!(out.stdout.trim_end().ends_with(": OK"), "{}", out.stdout);
    }
}
