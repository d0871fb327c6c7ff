// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

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
        "{} does not match the types in devices/src/host/topology/; regenerate it with \
         `UPDATE_SCHEMA=1 cargo test -p switchboard-devices --lib topology::tests::test_schema_file_is_current`",
        file.display()
    );
}

#[test]
fn test_restart_policy_is_read_with_defaults_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = r#"{ "devices": [
        { "id": "r0", "kind": "virtio-rng", "vhost_user": { "socket": "r0.sock" } },
        { "id": "r1", "kind": "virtio-rng",
          "vhost_user": { "socket": "r1.sock", "restart": "never" } },
        { "id": "r2", "kind": "virtio-rng",
          "vhost_user": { "socket": "r2.sock", "restart": { "limit": "0x3" } } },
        { "id": "f0", "kind": "virtio-fault",
          "vhost_user": { "socket": "f0.sock",
                          "restart": { "limit": 2, "backoff_ms": "10", "max_backoff_ms": 40 } } }
    ] }"#;
    let t = check_str(text, dir.path()).expect("valid");
    let policies: Vec<RestartPolicy> = t
        .devices
        .iter()
        .map(|d| d.vhost_user().expect("vhost-user").restart)
        .collect();
    assert_eq!(
        policies,
        [
            RestartPolicy::Never,
            RestartPolicy::Never,
            RestartPolicy::Limited(RestartLimits::new(3)),
            RestartPolicy::Limited(RestartLimits {
                limit: 2,
                backoff_ms: 10,
                max_backoff_ms: 40
            }),
        ]
    );
    assert_eq!(policies[3].backoff(1), Duration::from_millis(20));
    assert_eq!(policies[3].backoff(5), Duration::from_millis(40));
    // "never" is left out when written back, as a topology without it.
    let written = serde_json::to_value(&t.devices[1]).expect("serialize");
    assert!(written["vhost_user"].get("restart").is_none(), "{written}");
    let written = serde_json::to_value(&t.devices[3]).expect("serialize");
    assert_eq!(written["vhost_user"]["restart"]["limit"], 2);

    let text = r#"{ "devices": [
        { "id": "a", "kind": "virtio-rng", "vhost_user": { "socket": "a.sock", "restart": "always" } },
        { "id": "b", "kind": "virtio-rng", "vhost_user": { "socket": "b.sock", "restart": { "limit": 0 } } },
        { "id": "c", "kind": "virtio-rng",
          "vhost_user": { "socket": "c.sock", "restart": { "limit": 1, "backoff_ms": 50, "max_backoff_ms": 10 } } },
        { "id": "d", "kind": "virtio-rng",
          "vhost_user": { "socket": "d.sock", "restart": { "limit": 1, "max_backoff_ms": 3600001 } } },
        { "id": "e", "kind": "virtio-rng", "vhost_user": { "socket": "e.sock", "restart": { "tries": 1 } } },
        { "id": "f", "kind": "virtio-rng", "vhost_user": { "socket": "f.sock", "restart": { "limit": -1 } } }
    ] }"#;
    let e = errors(text, dir.path());
    let paths: Vec<&str> = e.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "devices[0].vhost_user.restart",
            "devices[1].vhost_user.restart.limit",
            "devices[2].vhost_user.restart.backoff_ms",
            "devices[3].vhost_user.restart.max_backoff_ms",
            // `limit` is missing, and `tries` unknown.
            "devices[4].vhost_user.restart",
            "devices[4].vhost_user.restart.tries",
            "devices[5].vhost_user.restart.limit",
        ],
        "{e:#?}"
    );
    assert!(e[0].message.contains("\"never\""), "{}", e[0].message);
    assert!(
        e[1].message.contains("at least 1 restart"),
        "{}",
        e[1].message
    );
    assert!(
        e[2].message.contains("`max_backoff_ms` (10 ms)"),
        "{}",
        e[2].message
    );
    assert!(e[3].message.contains("one hour"), "{}", e[3].message);
    assert!(e[4].message.contains("limit"), "{}", e[4].message);
    assert!(e[5].message.contains("tries"), "{}", e[5].message);
}
