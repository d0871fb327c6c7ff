// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Message logs of vhost-user devices driven by the `vhost` crate's real
//! frontend, replayed by the `switchboard replay` command: a session
//! replays with no divergence in both data modes; one changed byte of a
//! reply is reported at exactly its sequence number; a log cut off in a
//! record names the line and its prefix still replays; a log of a newer
//! format is refused. An MMIO/PIO session of `switchboard run`'s runner (a
//! UART with output, input and interrupts, and the test device) replays
//! with no divergence, and an altered reply, an altered or missing
//! interrupt message or a missing input is caught at its sequence number.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use switchboard_devices::models::blk::{Blk, BlkOptions, VIRTIO_BLK_S_OK};
use switchboard_devices::models::rng::Rng;
use switchboard_integration::frontend::{self, TestFrontend, VIRTQ_DESC_F_WRITE};
use switchboard_integration::{output_text as text, serve_in_process, switchboard_bin};
use switchboard_runtime::recording::{
    ActorInfo, Compress, DataMode, Header, LogFormat, RecordOptions, Recorder,
};
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(10);
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

fn recorder(path: &Path, mode: DataMode) -> Recorder {
    // As `switchboard run` writes it: the header lists the devices, and
    // their rebuild data comes in their `added` records.
    let actors = ["disk0", "rng0"]
        .map(|id| ActorInfo {
            id: id.into(),
            kind: String::new(),
            rebuild: None,
            not_replayable: None,
        })
        .to_vec();
    let header = Header::new("test".into(), mode, serde_json::json!({}), actors);
    Recorder::create(
        path,
        &header,
        RecordOptions {
            data: mode,
            // A log named `*.bin` is written in the binary form.
            format: if path.extension().is_some_and(|e| e == "bin") {
                LogFormat::Binary
            } else {
                LogFormat::JsonLines
            },
            // And `*.zst.bin` compresses its bulk data.
            compress: if path.to_string_lossy().ends_with(".zst.bin") {
                Compress::Zstd
            } else {
                Compress::None
            },
            ..RecordOptions::default()
        },
    )
    .expect("create the log")
}

fn one(fe: &mut TestFrontend, kind: u32, sector: u64, data: &[u8], writable: bool) -> u8 {
    fe.push_blk(0, 0, kind, sector, data, writable)
        .expect("place the request");
    fe.kick(0).expect("kick");
    fe.wait_used(0, 1, WAIT).expect("used");
    fe.blk_status(0).expect("status")
}

/// Records a session of a disk (`disk0`: reads, writes, flush, get-id, a
/// read of what was written, an out-of-range read) and an entropy device
/// (`rng0`) into `log`.
fn record_session(dir: &Path, log: &Path, mode: DataMode) {
    let image = dir.join("disk.img");
    let f = File::create(&image).expect("create image");
    f.set_len(4 << 20).expect("size image");
    for s in 0..(4 << 20) / 512u64 {
        f.write_all_at(&s.to_le_bytes(), s * 512).expect("fill");
    }
    drop(f);
    let rec = recorder(log, mode);
    // The one writer of the log, as switchboard's runtime installs it.
    let journal: std::sync::Arc<dyn switchboard_runtime::journal::Journal> = std::sync::Arc::new(
        switchboard_runtime::journal::RecordJournal::new(rec.clone()),
    );

    let blk = Blk::open(&image, &BlkOptions::default()).expect("open image");
    let served = serve_in_process(blk, 1, dir.join("blk.sock"));
    assert!(served.server.record_to(journal.clone(), "disk0"));
    let mut fe = frontend::connect(&served.socket, 1, 64).expect("connect blk");
    for i in 0..8u64 {
        assert_eq!(
            one(&mut fe, T_IN, i * 9, &[0u8; 4096], true),
            VIRTIO_BLK_S_OK
        );
        let pattern: Vec<u8> = (0..4096).map(|b| (b as u8) ^ (i as u8)).collect();
        assert_eq!(
            one(&mut fe, T_OUT, 1000 + i * 8, &pattern, false),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(
            one(&mut fe, T_IN, 1000 + i * 8, &[0u8; 4096], true),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(fe.blk_data(0, 4096).expect("data"), pattern);
    }
    assert_eq!(one(&mut fe, T_FLUSH, 0, &[], true), VIRTIO_BLK_S_OK);
    assert_eq!(one(&mut fe, T_GET_ID, 0, &[0u8; 20], true), VIRTIO_BLK_S_OK);
    // Past the end: an error status, recorded and replayed like the rest.
    assert_ne!(
        one(&mut fe, T_IN, 1 << 20, &[0u8; 512], true),
        VIRTIO_BLK_S_OK
    );
    drop(fe);

    let rng = serve_in_process(Rng::new(None).expect("rng"), 1, dir.join("rng.sock"));
    assert!(rng.server.record_to(journal.clone(), "rng0"));
    let mut fe = frontend::connect(&rng.socket, 1, 64).expect("connect rng");
    for (i, len) in [16u32, 64, 512, 4096].into_iter().enumerate() {
        let addr = 0x10_0000 + i as u64 * 0x1_0000;
        let head = fe
            .add_chain(0, &[(addr, len, VIRTQ_DESC_F_WRITE)])
            .expect("chain");
        fe.kick(0).expect("kick");
        let used = fe.wait_used(0, 1, WAIT).expect("used");
        assert_eq!(used, vec![(head, len)]);
        let mut got = vec![0u8; len as usize];
        fe.mem
            .read_slice(&mut got, GuestAddress(addr))
            .expect("read");
        assert!(got.iter().any(|b| *b != 0), "entropy is not all zeroes");
    }
    drop(fe);
    served.finish();
    rng.finish();
    rec.finish().expect("finish the log");
}

fn replay(log: &Path, more: &[&str]) -> Output {
    Command::new(switchboard_bin())
        .arg("replay")
        .arg(log)
        .args(more)
        .output()
        .expect("run switchboard replay")
}

/// The log's lines.
fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .expect("read the log")
        .lines()
        .map(String::from)
        .collect()
}

fn setup(mode: DataMode) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("session.log");
    record_session(dir.path(), &log, mode);
    (dir, log)
}

#[test]
fn test_a_recorded_session_replays_with_no_divergence_in_both_modes() {
    for mode in [DataMode::Hash, DataMode::Value] {
        let (_dir, log) = setup(mode);
        let all = lines(&log);
        let requests = all
            .iter()
            .filter(|l| l.contains("\"from\":\"driver/q0\""))
            .count();
        // 8 x 3 disk requests, flush, get-id, a bad read, 4 entropy requests.
        assert_eq!(requests, 24 + 3 + 4, "{mode:?}");
        let out = replay(&log, &[]);
        assert!(out.status.success(), "{mode:?}: {}", text(&out));
        let t = text(&out);
        assert!(t.contains("0 divergences"), "{t}");
        assert!(t.contains("disk0: "), "{t}");
        assert!(t.contains("rng0: "), "{t}");
        for device in ["disk0", "rng0"] {
            let out = replay(&log, &["--device", device]);
            assert!(out.status.success(), "{mode:?} {device}: {}", text(&out));
        }
    }
}

#[test]
fn test_a_binary_session_replays_with_no_divergence_and_lists_as_its_json_lines() {
    for mode in [DataMode::Hash, DataMode::Value] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("session.bin");
        record_session(dir.path(), &log, mode);
        let out = replay(&log, &[]);
        assert!(out.status.success(), "{mode:?}: {}", text(&out));
        let t = text(&out);
        assert!(t.contains("0 divergences"), "{t}");
        assert!(t.contains("disk0: ") && t.contains("rng0: "), "{t}");
        let listed = Command::new(switchboard_bin())
            .args(["log", "--json"])
            .arg(&log)
            .output()
            .expect("run switchboard log");
        assert!(listed.status.success(), "{}", text(&listed));
        let json = String::from_utf8(listed.stdout).expect("utf8");
        let requests = json
            .lines()
            .filter(|l| l.contains("\"from\":\"driver/q0\""))
            .count();
        assert_eq!(requests, 24 + 3 + 4, "{mode:?}");
        let size = std::fs::metadata(&log).expect("meta").len();
        assert!((size as usize) < json.len(), "{size} vs {}", json.len());
    }
}

/// The payload and reply of every request record of a log, as `log
/// --json` lists them.
fn request_bodies(log: &Path) -> Vec<(serde_json::Value, serde_json::Value)> {
    let listed = switchboard_log(&["--json".as_ref(), log.as_os_str()]);
    assert!(listed.status.success(), "{}", text(&listed));
    String::from_utf8(listed.stdout)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v["from"] == "driver/q0")
        .map(|v| (v["payload"].clone(), v["reply"].clone()))
        .collect()
}

#[test]
fn test_a_zstd_compressed_session_is_smaller_replays_and_lists_the_same_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (plain, packed) = (dir.path().join("a.bin"), dir.path().join("b.zst.bin"));
    record_session(dir.path(), &plain, DataMode::Value);
    record_session(dir.path(), &packed, DataMode::Value);
    let out = replay(&packed, &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("0 divergences"), "{t}");
    assert!(t.contains("disk0: ") && t.contains("rng0: "), "{t}");
    // The same requests with the same bytes, but for the entropy, which
    // differs from run to run (and does not compress).
    let (a, b) = (request_bodies(&plain), request_bodies(&packed));
    assert_eq!(a.len(), 24 + 3 + 4);
    assert_eq!(a[..27], b[..27]);
    let size = |p: &Path| std::fs::metadata(p).expect("meta").len();
    // 27 disk requests of 4 KiB blocks of sector numbers and patterns.
    assert!(
        size(&packed) * 2 < size(&plain),
        "{} vs {}",
        size(&packed),
        size(&plain)
    );
}

fn switchboard_log(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(switchboard_bin())
        .arg("log")
        .args(args)
        .output()
        .expect("run switchboard log")
}

#[test]
fn test_a_log_converted_to_binary_and_back_is_the_same_and_replays() {
    for mode in [DataMode::Hash, DataMode::Value] {
        let (dir, log) = setup(mode);
        let bin = dir.path().join("converted.bin");
        let back = dir.path().join("back.log");
        let out = switchboard_log(&[log.as_os_str(), "--convert".as_ref(), bin.as_os_str()]);
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        let records = lines(&log).len() - 1;
        assert!(
            t.contains(&format!(
                "{records} records converted from JSON Lines to binary"
            )),
            "{t}"
        );
        // Smaller, and replayed as the original is.
        let (json_len, bin_len) = (
            std::fs::metadata(&log).expect("meta").len(),
            std::fs::metadata(&bin).expect("meta").len(),
        );
        // Hashed requests take codec 1 (a fifth of their JSON, or less);
        // by value, the bytes themselves take the room.
        let factor = if mode == DataMode::Hash { 3 } else { 1 };
        assert!(bin_len * factor < json_len, "{bin_len} vs {json_len}");
        let out = replay(&bin, &["--no-progress"]);
        let t = text(&out);
        assert!(out.status.success(), "{mode:?}: {t}");
        assert!(t.contains("0 divergences") && t.contains("disk0: "), "{t}");
        let out = switchboard_log(&[
            bin.as_os_str(),
            "--convert".as_ref(),
            back.as_os_str(),
            "--to".as_ref(),
            "json".as_ref(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(lines(&back), lines(&log), "{mode:?}");
        // An existing output is never overwritten.
        let out = switchboard_log(&[log.as_os_str(), "--convert".as_ref(), back.as_os_str()]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains("must not exist"), "{}", text(&out));
        assert_eq!(lines(&back), lines(&log));
    }
}

/// Binary logs of format version 4 written by the build that introduced
/// it (two `replay_bench --keep` logs in the `log_reader` fuzz corpus:
/// small messages, and hashed 4 KiB requests): written again from their
/// JSON Lines, they come out byte for byte the same. A change to the
/// writer that changes what it writes fails here.
#[test]
fn test_version_4_logs_of_an_earlier_build_are_written_again_byte_for_byte() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/log_reader");
    let dir = tempfile::tempdir().expect("tempdir");
    for seed in [
        "40736a0c90e43fbb85bad7fc721d61cb5ed316e9",
        "c572c78dbf5ab1b7cb9b31e3d0e4d6108fd7517e",
    ] {
        let bin = corpus.join(seed);
        let json = dir.path().join(format!("{seed}.json"));
        let again = dir.path().join(format!("{seed}.bin"));
        for (from, to, form) in [(&bin, &json, "json"), (&json, &again, "binary")] {
            let out = switchboard_log(&[
                from.as_os_str(),
                "--convert".as_ref(),
                to.as_os_str(),
                "--to".as_ref(),
                form.as_ref(),
            ]);
            assert!(out.status.success(), "{seed} to {form}: {}", text(&out));
        }
        let (before, after) = (
            std::fs::read(&bin).expect("seed"),
            std::fs::read(&again).expect("again"),
        );
        assert!(before.len() > 1000, "{seed}: {} bytes", before.len());
        assert!(
            before == after,
            "{seed}: {} bytes written again as {}",
            before.len(),
            after.len()
        );
    }
}

#[test]
fn test_a_damaged_log_converts_up_to_the_damage_and_exits_2() {
    let (dir, log) = setup(DataMode::Hash);
    let bin = dir.path().join("session.bin");
    let out = switchboard_log(&[log.as_os_str(), "--convert".as_ref(), bin.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out));
    // A flipped bit in the middle of the last record's frame.
    let mut buf = std::fs::read(&bin).expect("read");
    let at = buf.len() - 8;
    buf[at] ^= 0x04;
    let bad = dir.path().join("bad.bin");
    std::fs::write(&bad, &buf).expect("write");
    let json = dir.path().join("prefix.log");
    let out = switchboard_log(&[bad.as_os_str(), "--convert".as_ref(), json.as_os_str()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    let all = lines(&log);
    let last = all.len();
    assert!(t.contains(&format!(":{last}: record {last} ")), "{t}");
    assert!(t.contains("is corrupt: checksum mismatch"), "{t}");
    assert!(
        t.contains(&format!("the {} records converted", last - 2)),
        "{t}"
    );
    assert_eq!(lines(&json), all[..last - 1]);
}

/// The entropy requests `switchboard log` lists in `log` (as far as it
/// reads: a log still being written may end in the middle of a record).
fn entropy_records(log: &Path) -> u64 {
    let listed = Command::new(switchboard_bin())
        .args(["log", "--json", "--type", "entropy"])
        .arg(log)
        .output()
        .expect("run switchboard log");
    String::from_utf8_lossy(&listed.stdout).lines().count() as u64
}

/// `switchboard serve rng --record LOG --record-format FORMAT` made 100
/// entropy requests, waited until the log held them, made 100 more and was
/// killed with SIGKILL at once: the log it leaves.
fn killed_recording(dir: &Path, format: &str) -> PathBuf {
    let sock = dir.join(format!("rng-{format}.sock"));
    let log = dir.join(format!("killed.{format}"));
    let mut child = Command::new(switchboard_bin())
        .args(["serve", "rng", "--socket-path"])
        .arg(&sock)
        .arg("--record")
        .arg(&log)
        .args(["--record-format", format])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start switchboard serve rng");
    let deadline = std::time::Instant::now() + WAIT;
    while !(sock.exists() && log.exists()) {
        assert!(child.try_wait().expect("wait").is_none(), "serve exited");
        assert!(std::time::Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut fe = frontend::connect(&sock, 1, 64).expect("connect rng");
    let mut request = || {
        fe.add_chain(0, &[(0x10_0000, 16, VIRTQ_DESC_F_WRITE)])
            .expect("chain");
        fe.kick(0).expect("kick");
        fe.wait_used(0, 1, WAIT).expect("used");
    };
    for _ in 0..100 {
        request();
    }
    // The running process writes its records out without being stopped:
    // the first 100 reach the file while it serves.
    let deadline = std::time::Instant::now() + WAIT;
    while entropy_records(&log) < 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "{format}: the first 100 requests never reached the log ({} did)",
            entropy_records(&log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..100 {
        request();
    }
    // SIGKILL, with no pause after the last answer: nothing is finished,
    // and the writer may be in the middle of a record.
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    drop(fe);
    log
}

#[test]
fn test_a_recorder_killed_with_sigkill_leaves_a_log_that_replays_up_to_its_last_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in ["binary", "json"] {
        let log = killed_recording(dir.path(), format);
        let out = replay(&log, &["--no-progress"]);
        let t = text(&out);
        // The writer hands the file whole records, so the log normally ends
        // at a record boundary (exit 0); a cut one replays its prefix and
        // exits 2.
        let replayed: u64 = match out.status.code() {
            Some(0) => t
                .split(" messages replayed, 0 divergences")
                .next()
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{format}: {t}")),
            Some(2) => {
                assert!(t.contains("the log ends in the middle of a record"), "{t}");
                t.split(" messages before the damage replayed with 0 divergences")
                    .next()
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{format}: {t}"))
            }
            _ => panic!("{format}: {t}"),
        };
        let entropy = entropy_records(&log);
        // What reached the file before the kill survives it: at least the
        // first 100 (how many of the last 100 made it depends on when the
        // writer last ran, which a loaded machine decides).
        assert!(entropy >= 100, "{format}: {entropy} of 200 in the log\n{t}");
        assert!(entropy <= 200, "{format}: {entropy} of 200 in the log\n{t}");
        assert!(replayed >= entropy, "{format}: {replayed} < {entropy}\n{t}");
        eprintln!("{format}: {entropy} of 200 requests in the log; {t}");
    }
}

/// The log with `f` applied to line `index` (0 is the header).
fn edit(log: &Path, index: usize, f: impl FnOnce(&str) -> String) -> PathBuf {
    let mut all = lines(log);
    all[index] = f(&all[index]);
    let out = log.with_extension("edited");
    std::fs::write(&out, all.join("\n") + "\n").expect("write");
    out
}

fn seq_of(line: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(line).expect("record");
    v["seq"].as_u64().expect("seq")
}

#[test]
fn test_one_changed_byte_of_a_reply_is_reported_at_its_sequence_number() {
    let (_dir, log) = setup(DataMode::Value);
    let all = lines(&log);
    // The fifth read's reply: its data (by value) and its status byte.
    let index = all
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("\"type\":\"read\""))
        .nth(4)
        .map(|(i, _)| i)
        .expect("a fifth read");
    let seq = seq_of(&all[index]);
    let edited = edit(&log, index, |l| {
        let v: serde_json::Value = serde_json::from_str(l).expect("record");
        let data = v["reply"]["writes"][0]["data"]
            .as_str()
            .expect("data")
            .to_string();
        // Flip one base64 digit in the middle: one byte changes.
        let mid = data.len() / 2;
        let c = data.as_bytes()[mid];
        let flipped = if c == b'A' { 'B' } else { 'A' };
        let changed = format!("{}{}{}", &data[..mid], flipped, &data[mid + 1..]);
        l.replacen(&data, &changed, 1)
    });
    let out = replay(&edited, &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains(&format!("divergence at seq {seq} ")), "{t}");
    assert!(t.contains("guest-memory write 0"), "{t}");
    assert!(t.contains("differs: expected"), "{t}");
    assert!(t.contains("expected:") && t.contains("actual:"), "{t}");
    assert!(t.contains("messages disk0 handled before it"), "{t}");

    // The status byte of a write's reply, in a hashed log.
    let (_dir2, log) = setup(DataMode::Hash);
    let all = lines(&log);
    let index = all
        .iter()
        .position(|l| l.contains("\"type\":\"write\""))
        .expect("a write");
    let seq = seq_of(&all[index]);
    // Status OK (0) is "b64:AA=="; make it 1 (IOERR).
    let edited = edit(&log, index, |l| {
        assert!(l.contains("\"data\":\"b64:AA==\""), "{l}");
        l.replacen("\"data\":\"b64:AA==\"", "\"data\":\"b64:AQ==\"", 1)
    });
    let out = replay(&edited, &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains(&format!("divergence at seq {seq} ")), "{t}");
    assert!(t.contains("byte 0 differs: expected 0x01, got 0x00"), "{t}");
}

/// The replay's report of `log`, from its first divergence on.
fn divergence_report(log: &Path) -> String {
    let out = replay(log, &["--no-progress"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let at = t.find("divergence at seq").expect("a divergence");
    t[at..].to_string()
}

#[test]
fn test_a_divergence_reads_the_same_in_the_binary_form() {
    // A read's data (by value: bytes shown) and a write's status byte
    // (hashed log), each changed, then converted: the binary log is
    // replayed without JSON, and must say all the JSON form says.
    for (mode, kind) in [(DataMode::Value, "read"), (DataMode::Hash, "write")] {
        let (dir, log) = setup(mode);
        let all = lines(&log);
        let index = all
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains(&format!("\"type\":\"{kind}\"")))
            .nth(2)
            .map(|(i, _)| i)
            .expect("a third such request");
        let edited = edit(&log, index, |l| {
            let at = l.find("\"writes\":[{\"at\":").expect("writes");
            let data = at + l[at..].find("b64:").expect("by value") + 4;
            let c = l.as_bytes()[data];
            let flipped = if c == b'A' { 'B' } else { 'A' };
            format!("{}{flipped}{}", &l[..data], &l[data + 1..])
        });
        let bin = dir.path().join("edited.bin");
        let out = switchboard_log(&[edited.as_os_str(), "--convert".as_ref(), bin.as_os_str()]);
        assert!(out.status.success(), "{}", text(&out));
        let json = divergence_report(&edited);
        assert!(json.contains("messages disk0 handled before it"), "{json}");
        assert_eq!(divergence_report(&bin), json, "{mode:?}");
    }
}

#[test]
fn test_a_cut_off_log_names_the_line_and_its_prefix_replays() {
    let (_dir, log) = setup(DataMode::Hash);
    let all = lines(&log);
    let cut_line = all.len() - 3;
    let mut text_ = all[..cut_line].join("\n") + "\n";
    text_.push_str(&all[cut_line][..all[cut_line].len() / 2]);
    let cut = log.with_extension("cut");
    std::fs::write(&cut, &text_).expect("write");
    let out = replay(&cut, &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    // Lines count from 1; the header is line 1.
    assert!(
        t.contains(&format!(
            ":{}: the log ends in the middle of a record",
            cut_line + 1
        )),
        "{t}"
    );
    assert!(
        t.contains("before the damage replayed with 0 divergences"),
        "{t}"
    );
    let messages = all[1..cut_line]
        .iter()
        .filter(|l| l.contains("\"from\":\"driver/q0\"") || l.contains("GET_CONFIG"))
        .count();
    assert!(messages > 20, "{messages}");
}

#[test]
fn test_a_log_of_a_newer_format_is_refused() {
    let (_dir, log) = setup(DataMode::Hash);
    let edited = edit(&log, 0, |l| {
        let mut v: serde_json::Value = serde_json::from_str(l).expect("header");
        // Versions 2 to 4 are the binary form; 5 is newer than this
        // build reads.
        v["version"] = serde_json::json!(5);
        v["switchboard"] = serde_json::json!("7.1.0");
        v["compression"] = serde_json::json!("zstd");
        v.to_string()
    });
    let out = replay(&edited, &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains(":1: log format version 5"), "{t}");
    assert!(t.contains("use switchboard 7.1.0 or newer"), "{t}");
    assert!(!t.contains("divergence"), "{t}");
}

#[test]
fn test_mmio_accesses_are_recorded_on_the_bus_and_the_device_and_the_device_replays() {
    use switchboard_devices::host::fleet::Fleet;
    use switchboard_devices::host::topology::{BusId, DeviceSpec, TestDeviceSpec};
    use switchboard_runtime::{AccessReply, AccessSize, ActorId, BusAddr, DeviceId};

    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("mmio.log");
    let header = Header::new(
        "test".into(),
        DataMode::Hash,
        serde_json::json!({}),
        vec![ActorInfo {
            id: "pio0".into(),
            kind: "bus".into(),
            rebuild: None,
            not_replayable: Some("a bus".into()),
        }],
    );
    let rec = Recorder::create(&log, &header, RecordOptions::default()).expect("log");
    let fleet = Fleet::new_recording(Some(rec.clone())).expect("fleet");
    fleet.add_bus("pio0").expect("bus");
    fleet
        .add(&DeviceSpec::TestDevice(TestDeviceSpec {
            id: DeviceId::new("slow0"),
            bus: BusId::new("pio0"),
            addr: BusAddr(0x1000),
            read_delay_us: 0,
        }))
        .expect("test device");
    let bus = fleet.bus("pio0").expect("bus handle");
    let me = ActorId::new("vcpu0");
    for _ in 0..3 {
        let r = futures::executor::block_on(bus.read(&me, BusAddr(0x1000), AccessSize::B8))
            .expect("read");
        assert_eq!(
            r,
            AccessReply::Read {
                value: switchboard_devices::models::slow::SLOW_ID
            }
        );
    }
    fleet.remove("slow0").expect("remove");
    rec.finish().expect("finish");

    let records: Vec<serde_json::Value> = lines(&log)[1..]
        .iter()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    let to = |id: &str| records.iter().filter(|r| r["to"] == id).collect::<Vec<_>>();
    // Each read reaches the bus from vcpu0, is forwarded to the device, and
    // the device's record holds the reply.
    let bus_reads = to("pio0");
    assert_eq!(bus_reads.len(), 3, "{records:?}");
    assert!(bus_reads
        .iter()
        .all(|r| r["from"] == "vcpu0" && r["reply"]["forwarded"]["to"] == "slow0"));
    let dev = to("slow0");
    let kinds: Vec<&str> = dev.iter().filter_map(|r| r["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"added"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"removed"), "{kinds:?}");
    let answered: Vec<_> = dev
        .iter()
        .filter(|r| r["from"] == "pio0")
        .map(|r| r["reply"].to_string())
        .collect();
    assert_eq!(answered.len(), 3, "{dev:?}");
    assert!(
        answered
            .iter()
            .all(|r| r.contains(&switchboard_devices::models::slow::SLOW_ID.to_string())),
        "{answered:?}"
    );

    let added = dev.first().expect("an added record");
    assert_eq!(
        added["payload"]["rebuild"],
        serde_json::json!({ "read_delay_ns": 0 })
    );

    let out = replay(&log, &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("slow0: 3 messages replayed, all matched"), "{t}");
    assert!(t.contains("pio0: 3 messages not replayed: a bus"), "{t}");
}

/// Register accesses of one vCPU through a bus of the fleet: sent to the
/// bus actor, or through the bus's vCPU entry point (`port`).
struct Vcpu {
    bus: switchboard_bus::BusHandle,
    me: switchboard_runtime::ActorId,
    port: Option<std::cell::RefCell<switchboard_bus::VcpuPort>>,
}

impl Vcpu {
    fn new(bus: switchboard_bus::BusHandle, me: switchboard_runtime::ActorId, port: bool) -> Self {
        let port = port.then(|| std::cell::RefCell::new(bus.vcpu(me.clone())));
        Vcpu { bus, me, port }
    }

    fn access(
        &self,
        access: switchboard_bus::BusAccess,
    ) -> switchboard_runtime::Answer<switchboard_runtime::AccessReply> {
        match &self.port {
            Some(port) => port.borrow_mut().access(access),
            None => self.bus.access(&self.me, access).wait(),
        }
    }

    fn read(&self, addr: u64, size: switchboard_runtime::AccessSize) -> u64 {
        let r = self.access(switchboard_bus::BusAccess {
            addr: switchboard_runtime::BusAddr(addr),
            size,
            op: switchboard_runtime::AccessOp::Read,
        });
        match r {
            Ok(switchboard_runtime::AccessReply::Read { value }) => value,
            other => panic!("read {addr:#x}: {other:?}"),
        }
    }

    fn write(&self, addr: u64, size: switchboard_runtime::AccessSize, value: u64) {
        let r = self.access(switchboard_bus::BusAccess {
            addr: switchboard_runtime::BusAddr(addr),
            size,
            op: switchboard_runtime::AccessOp::Write { value },
        });
        assert_eq!(
            r,
            Ok(switchboard_runtime::AccessReply::Written),
            "write {addr:#x}"
        );
    }

    fn inb(&self, reg: u8) -> u8 {
        self.read(COM1 + u64::from(reg), switchboard_runtime::AccessSize::B1) as u8
    }

    fn outb(&self, reg: u8, value: u8) {
        self.write(
            COM1 + u64::from(reg),
            switchboard_runtime::AccessSize::B1,
            u64::from(value),
        );
    }
}

const COM1: u64 = 0x3f8;
const SLOW0: u64 = 0xd000_0000;

/// Records, through `switchboard run`'s runner and header, a session of the
/// UART `com1` (set up as Linux's 8250 driver does, output read on its
/// socket, input typed into it, with interrupts) and the test device
/// `slow0` (writes, reads of every register, reads answered 500 us late,
/// one of them overtaken by a write). With `ports`, every access but the
/// overtaken read goes through the buses' vCPU entry points; returns how
/// many ran on the test's thread.
fn record_mmio_session(dir: &Path, log: &Path, ports: bool) -> u64 {
    use switchboard_devices::models::uart::regs::*;
    use switchboard_runtime::AccessSize;

    let topology = serde_json::json!({
        "buses": [
            { "id": "pio0", "kind": "pio" },
            { "id": "mmio0", "kind": "mmio", "size": "0x100000000" }
        ],
        "devices": [
            { "id": "com1", "kind": "uart-16550", "bus": "pio0", "addr": "0x3f8",
              "output": "unix:com1.sock" },
            { "id": "slow0", "kind": "test-device", "bus": "mmio0", "addr": "0xd0000000",
              "read_delay_us": 500 }
        ]
    });
    let topology = switchboard_devices::host::topology::check_str(&topology.to_string(), dir)
        .expect("topology");
    let header = Header::new(
        "test".into(),
        DataMode::Hash,
        serde_json::to_value(&topology).expect("topology as JSON"),
        switchboard_devices::host::runner::log_actors(&topology),
    );
    let rec = Recorder::create(
        log,
        &header,
        RecordOptions {
            data: DataMode::Hash,
            ..RecordOptions::default()
        },
    )
    .expect("create the log");
    let (runner, started) = switchboard_devices::host::runner::Runner::start_recording(
        topology,
        dir,
        Some(rec.clone()),
    )
    .expect("start");
    for s in &started {
        assert!(s.result.is_ok(), "{}: {:?}", s.id, s.result);
    }
    let fleet = runner.fleet();
    let me = switchboard_runtime::ActorId::new("vcpu0");
    let pio = Vcpu::new(fleet.bus("pio0").expect("pio0"), me.clone(), ports);
    let mmio = Vcpu::new(fleet.bus("mmio0").expect("mmio0"), me, ports);
    let mut client =
        std::os::unix::net::UnixStream::connect(dir.join("com1.sock")).expect("connect com1");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");

    // serial8250_startup(): 115200 8N1, FIFOs, OUT2 and both interrupts on;
    // THRE raises the line, reading IIR lowers it.
    pio.outb(LCR, LCR_DLAB);
    pio.outb(DLL, 1);
    pio.outb(DLM, 0);
    pio.outb(LCR, 0x03);
    pio.outb(FCR, FCR_FIFO_ENABLE | FCR_CLEAR_RX | FCR_CLEAR_TX);
    pio.outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
    pio.outb(IER, IER_ERBFI | IER_ETBEI);
    assert_eq!(pio.inb(IIR), IIR_FIFO_ENABLED | IIR_THR_EMPTY);
    pio.outb(IER, IER_ERBFI);
    // Output, polling THRE before each byte.
    let text_out = b"login: ";
    for &b in text_out {
        assert_ne!(pio.inb(LSR) & LSR_THRE, 0);
        pio.outb(THR, b);
    }
    let mut got = vec![0u8; text_out.len()];
    std::io::Read::read_exact(&mut client, &mut got).expect("output on the socket");
    assert_eq!(&got, text_out);
    // Input: typed into the socket, read while LSR says data is ready.
    std::io::Write::write_all(&mut client, b"root\n").expect("type");
    let mut received = Vec::new();
    let start = std::time::Instant::now();
    while received.len() < 5 {
        assert!(start.elapsed() < WAIT, "input lost: got {received:?}");
        if pio.inb(LSR) & LSR_DR != 0 {
            received.push(pio.inb(RBR));
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(received, b"root\n");
    assert_eq!(pio.inb(IIR) & IIR_NO_INTERRUPT, IIR_NO_INTERRUPT);
    // THRE raises the line again and nobody acknowledges it: the UART
    // lowers it when it stops.
    pio.outb(IER, IER_ERBFI | IER_ETBEI);

    // The test device.
    use switchboard_devices::models::slow::{COUNTER_TAG, REG_COUNTER, REG_DATA, REG_ID, SLOW_ID};
    mmio.write(SLOW0 + REG_DATA, AccessSize::B4, 0x1234_5678);
    assert_eq!(mmio.read(SLOW0 + REG_DATA, AccessSize::B4), 0x1234_5678);
    for n in 1..=3 {
        assert_eq!(
            mmio.read(SLOW0 + REG_COUNTER, AccessSize::B4),
            COUNTER_TAG | n
        );
    }
    assert_eq!(mmio.read(SLOW0 + REG_ID, AccessSize::B8), SLOW_ID);
    // A read waits 500 us; a write sent meanwhile is answered first.
    let late = mmio.bus.read(
        &mmio.me,
        switchboard_runtime::BusAddr(SLOW0 + REG_DATA),
        AccessSize::B8,
    );
    mmio.write(SLOW0 + REG_DATA, AccessSize::B8, 0xabc);
    let late = futures::executor::block_on(late).expect("the late read");
    assert!(
        matches!(late, switchboard_runtime::AccessReply::Read { value } if value == 0xabc || value == 0x1234_5678),
        "{late:?}"
    );

    let here = [&pio, &mmio]
        .iter()
        .filter_map(|v| v.port.as_ref().map(|p| p.borrow().stats().here))
        .sum();
    for (id, r) in runner.shutdown() {
        r.unwrap_or_else(|e| panic!("remove {id}: {e}"));
    }
    drop(runner);
    rec.finish().expect("finish the log");
    here
}

/// The records of `log` (header left out), parsed.
fn records(log: &Path) -> Vec<serde_json::Value> {
    lines(log)[1..]
        .iter()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect()
}

/// The line index (0 is the header) of the first record `f` accepts.
fn find(log: &Path, f: impl Fn(&serde_json::Value) -> bool) -> usize {
    records(log)
        .iter()
        .position(f)
        .map(|i| i + 1)
        .expect("a matching record")
}

#[test]
fn test_an_mmio_pio_session_replays_with_no_divergence() {
    check_mmio_session(false);
}

#[test]
fn test_an_mmio_pio_session_through_vcpu_ports_replays_with_no_divergence() {
    check_mmio_session(true);
}

fn check_mmio_session(ports: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("mmio.log");
    let here = record_mmio_session(dir.path(), &log, ports);
    if ports {
        assert!(here > 20, "only {here} accesses ran on the vCPU thread");
    }
    let recs = records(&log);
    let count = |f: &dyn Fn(&serde_json::Value) -> bool| recs.iter().filter(|r| f(r)).count();
    let input: String = recs
        .iter()
        .filter(|r| r["type"] == "input")
        .inspect(|r| assert!(r["from"] == "sink" && r["to"] == "com1", "{r}"))
        .map(|r| r["payload"]["data"].as_str().expect("data").to_string())
        .collect();
    assert!(input.starts_with("b64:"), "{input}");
    let irqs: Vec<bool> = recs
        .iter()
        .filter(|r| r["type"] == "irq")
        .inspect(|r| assert!(r["from"] == "com1" && r["to"] == "irq/4", "{r}"))
        .map(|r| r["payload"]["high"].as_bool().expect("level"))
        .collect();
    // THRE up and down, received data up and down, THRE up and down at
    // removal.
    // (More in between if the input came in several pieces.)
    assert!(irqs.len() >= 6, "{irqs:?}");
    assert!(irqs.windows(2).all(|w| w[0] != w[1]), "{irqs:?}");
    assert!(irqs.starts_with(&[true, false]) && irqs.ends_with(&[true, false]));
    let com1: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| r["to"] == "com1" || r["from"] == "com1")
        .collect();
    let kinds: Vec<&str> = com1[com1.len() - 2..]
        .iter()
        .map(|r| r["type"].as_str().expect("type"))
        .collect();
    assert_eq!(kinds, ["irq", "removed"], "lowered as it stopped");
    assert!(count(&|r| r["to"] == "com1" && r["from"] == "pio0") > 20);
    assert_eq!(
        count(&|r| r["to"] == "slow0" && r["type"] == "read"),
        6,
        "{recs:?}"
    );
    let header: serde_json::Value = serde_json::from_str(&lines(&log)[0]).expect("header");
    let actors = header["actors"].as_array().expect("actors");
    let rebuild = |id: &str| {
        actors
            .iter()
            .find(|a| a["id"] == id)
            .map(|a| a["rebuild"].clone())
    };
    assert_eq!(rebuild("com1"), Some(serde_json::json!({ "irq": 4 })));
    assert_eq!(
        rebuild("slow0"),
        Some(serde_json::json!({ "read_delay_ns": 500_000 }))
    );

    let out = replay(&log, &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("0 divergences"), "{t}");
    assert!(t.contains("com1: "), "{t}");
    assert!(t.contains("slow0: 8 messages replayed, all matched"), "{t}");
    assert!(!t.contains("com1: 0"), "{t}");
    for device in ["com1", "slow0"] {
        let out = replay(&log, &["--device", device]);
        assert!(out.status.success(), "{device}: {}", text(&out));
    }
}

#[test]
fn test_an_altered_mmio_reply_or_interrupt_is_caught_at_its_sequence_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("mmio.log");
    record_mmio_session(dir.path(), &log, false);
    let caught = |edited: &Path| {
        let out = replay(edited, &[]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{t}");
        t
    };

    // The UART's answer to the read of RBR that gave 'o' (0x6f).
    let index = find(&log, |r| {
        r["to"] == "com1" && r["payload"]["offset"] == 0 && r["reply"]["Ok"]["value"] == 0x6f
    });
    let seq = seq_of(&lines(&log)[index]);
    let edited = edit(&log, index, |l| {
        l.replacen("\"value\":111", "\"value\":112", 1)
    });
    let t = caught(&edited);
    assert!(t.contains(&format!("divergence at seq {seq} ")), "{t}");
    assert!(t.contains("read message to com1"), "{t}");
    assert!(
        t.contains("reply to the 1-byte read at offset 0x0 of region 0"),
        "{t}"
    );
    assert!(t.contains("expected: read 0x70"), "{t}");
    assert!(t.contains("actual:   read 0x6f"), "{t}");
    assert!(t.contains("messages com1 handled before it"), "{t}");

    // The test device's second counter read.
    let index = records(&log)
        .iter()
        .enumerate()
        .filter(|(_, r)| r["to"] == "slow0" && r["payload"]["offset"] == 16)
        .nth(1)
        .map(|(i, _)| i + 1)
        .expect("a second counter read");
    let seq = seq_of(&lines(&log)[index]);
    let value = 0x5100_0002u64;
    let edited = edit(&log, index, |l| {
        l.replacen(&format!("\"value\":{value}"), "\"value\":0", 1)
    });
    let t = caught(&edited);
    assert!(t.contains(&format!("divergence at seq {seq} ")), "{t}");
    assert!(t.contains("actual:   read 0x51000002"), "{t}");

    // An interrupt message: the first raise of the line recorded as a lower.
    let index = find(&log, |r| r["type"] == "irq");
    let seq = seq_of(&lines(&log)[index]);
    let edited = edit(&log, index, |l| {
        l.replacen("\"high\":true", "\"high\":false", 1)
    });
    let t = caught(&edited);
    assert!(t.contains(&format!("divergence at seq {seq} ")), "{t}");
    assert!(t.contains("irq message from com1"), "{t}");
    assert!(t.contains("expected: line 4 low"), "{t}");
    assert!(t.contains("actual:   line 4 high"), "{t}");

    // The same interrupt message left out: its cause is where it differs.
    let cause = records(&log)[index..]
        .iter()
        .find(|r| r["to"] == "com1")
        .map(|r| r["seq"].as_u64().expect("seq"))
        .expect("the record that raised the line");
    let mut all = lines(&log);
    all.remove(index);
    let edited = log.with_extension("without-irq");
    std::fs::write(&edited, all.join("\n") + "\n").expect("write");
    let t = caught(&edited);
    assert!(t.contains(&format!("divergence at seq {cause} ")), "{t}");
    assert!(
        t.contains("an interrupt message the log does not hold"),
        "{t}"
    );

    // The first input left out: the interrupt it raised, recorded just
    // before it, is the first record the replay disagrees with.
    let index = find(&log, |r| r["type"] == "input");
    let raised = records(&log)[..index - 1]
        .iter()
        .rev()
        .find(|r| r["type"] == "irq")
        .cloned()
        .expect("the interrupt the input raised");
    assert_eq!(raised["payload"]["high"], true);
    let mut all = lines(&log);
    all.remove(index);
    let edited = log.with_extension("without-input");
    std::fs::write(&edited, all.join("\n") + "\n").expect("write");
    let t = caught(&edited);
    assert!(
        t.contains(&format!("divergence at seq {} ", raised["seq"])),
        "{t}"
    );
    assert!(t.contains("the replayed device did not send it"), "{t}");
}
