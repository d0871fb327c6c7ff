// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-blk served over vhost-user on a real image file, driven by the
//! `vhost` crate's real frontend in process: reads and writes checked
//! against the file, every request type, read-only mode, the bad-request
//! matrix, draining on REM_MEM_REG and GET_VRING_BASE, multi-queue and
//! reconnect.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use switchboard_devices::models::blk::{
    Blk, BlkOptions, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use switchboard_integration::frontend::{
    self, blk_header, blk_slot, region_infos, TestFrontend, VIRTQ_DESC_F_WRITE,
};
use switchboard_integration::{serve_in_process, Served};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Image size in the tests: 8 MiB.
const IMAGE_SIZE: u64 = 8 << 20;
const SECTORS: u64 = IMAGE_SIZE / 512;
const WAIT: Duration = Duration::from_secs(10);

struct Backend {
    served: Served<Blk>,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

fn start(options: BlkOptions, workers: usize) -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let f = File::create(&image).expect("create image");
    f.set_len(IMAGE_SIZE).expect("size image");
    // Known content: every sector starts with its number.
    for s in 0..SECTORS {
        f.write_all_at(&s.to_le_bytes(), s * 512).expect("fill");
    }
    drop(f);
    let blk = Blk::open(&image, &options).expect("open image");
    let served = serve_in_process(blk, workers, dir.path().join("blk.sock"));
    Backend {
        served,
        image,
        _dir: dir,
    }
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out: {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Places a standard request (header, data, status) in slot `n`
/// ([`TestFrontend::push_blk`]).
fn request(
    fe: &mut TestFrontend,
    q: usize,
    n: u64,
    kind: u32,
    sector: u64,
    data: &[u8],
    data_writable: bool,
) -> u16 {
    fe.push_blk(q, n, kind, sector, data, data_writable)
        .expect("place the request")
}

fn status(fe: &TestFrontend, n: u64) -> u8 {
    fe.blk_status(n).expect("status")
}

fn data(fe: &TestFrontend, n: u64, len: usize) -> Vec<u8> {
    fe.blk_data(n, len).expect("data")
}

/// Sends one request on queue 0 and waits for it; returns (status, used len).
fn one(fe: &mut TestFrontend, kind: u32, sector: u64, data: &[u8], writable: bool) -> (u8, u32) {
    let head = request(fe, 0, 0, kind, sector, data, writable);
    fe.kick(0).expect("kick");
    let used = fe.wait_used(0, 1, WAIT).expect("used");
    assert_eq!(used[0].0, head);
    (status(fe, 0), used[0].1)
}

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    File::open(path)
        .expect("open image")
        .read_exact_at(&mut v, offset)
        .expect("read image");
    v
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn test_writes_reach_the_image_and_reads_return_it() {
    let b = start(BlkOptions::default(), 1);
    let mut fe = frontend::connect(&b.served.socket, 1, 64).expect("connect");

    // Reads of the known content, at several offsets and sizes.
    for (sector, len) in [
        (0u64, 512usize),
        (7, 4096),
        (SECTORS - 8, 4096),
        (100, 65536),
    ] {
        let (st, used) = one(&mut fe, T_IN, sector, &vec![0u8; len], true);
        assert_eq!(st, VIRTIO_BLK_S_OK, "read sector {sector}");
        assert_eq!(used as usize, len + 1, "used length counts data and status");
        assert_eq!(
            data(&fe, 0, len),
            file_bytes(&b.image, sector * 512, len),
            "read of sector {sector}"
        );
    }

    // Writes, then the file on the host holds them.
    for (seed, sector, len) in [(1u8, 0u64, 512usize), (2, 33, 8192), (3, SECTORS - 1, 512)] {
        let p = pattern(seed, len);
        let (st, used) = one(&mut fe, T_OUT, sector, &p, false);
        assert_eq!(st, VIRTIO_BLK_S_OK, "write sector {sector}");
        assert_eq!(used, 1, "a write writes only the status");
        assert_eq!(
            file_bytes(&b.image, sector * 512, len),
            p,
            "sector {sector}"
        );
    }

    // A read whose data spans two descriptors, across a write's edge.
    let s = blk_slot(1);
    fe.mem
        .write_slice(&blk_header(T_IN, 32), GuestAddress(s.hdr))
        .expect("header");
    let head = fe
        .add_chain(
            0,
            &[
                (s.hdr, 16, 0),
                (s.data, 1024, VIRTQ_DESC_F_WRITE),
                (s.data + 0x8000, 1024, VIRTQ_DESC_F_WRITE),
                (s.status, 1, VIRTQ_DESC_F_WRITE),
            ],
        )
        .expect("chain");
    fe.kick(0).expect("kick");
    assert_eq!(fe.wait_used(0, 1, WAIT).expect("used"), vec![(head, 2049)]);
    assert_eq!(status(&fe, 1), VIRTIO_BLK_S_OK);
    let want = file_bytes(&b.image, 32 * 512, 2048);
    let mut a = vec![0u8; 1024];
    let mut c = vec![0u8; 1024];
    fe.mem.read_slice(&mut a, GuestAddress(s.data)).expect("a");
    fe.mem
        .read_slice(&mut c, GuestAddress(s.data + 0x8000))
        .expect("c");
    assert_eq!([a, c].concat(), want);
    assert_eq!(&want[512..1024], &pattern(2, 8192)[..512]);
}

#[test]
fn test_flush_get_id_discard_and_write_zeroes() {
    let b = start(
        BlkOptions {
            serial: Some("sb-serial-01".into()),
            ..BlkOptions::default()
        },
        1,
    );
    let mut fe = frontend::connect(&b.served.socket, 1, 64).expect("connect");

    assert_eq!(one(&mut fe, T_FLUSH, 0, &[], true), (VIRTIO_BLK_S_OK, 1));

    let (st, used) = one(&mut fe, T_GET_ID, 0, &[0xaa; 20], true);
    assert_eq!((st, used), (VIRTIO_BLK_S_OK, 21));
    let mut want = b"sb-serial-01".to_vec();
    want.resize(20, 0);
    assert_eq!(data(&fe, 0, 20), want);

    // write-zeroes without unmap, then with unmap, then discard: all read
    // back as zeroes (discard punches a hole on this file system).
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    };
    let two = [seg(64, 8, 0), seg(200, 16, 0)].concat();
    assert_eq!(
        one(&mut fe, T_WRITE_ZEROES, 0, &two, false).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(file_bytes(&b.image, 64 * 512, 8 * 512), vec![0; 8 * 512]);
    assert_eq!(file_bytes(&b.image, 200 * 512, 16 * 512), vec![0; 16 * 512]);
    assert_ne!(
        file_bytes(&b.image, 72 * 512, 8),
        vec![0; 8],
        "zeroed too much"
    );
    assert_eq!(
        one(&mut fe, T_WRITE_ZEROES, 0, &seg(300, 8, 1), false).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(file_bytes(&b.image, 300 * 512, 8 * 512), vec![0; 8 * 512]);
    assert_eq!(
        one(&mut fe, T_DISCARD, 0, &seg(4096, 2048, 0), false).0,
        VIRTIO_BLK_S_OK
    );
    let len = File::open(&b.image)
        .expect("open")
        .metadata()
        .expect("meta")
        .len();
    assert_eq!(len, IMAGE_SIZE, "discard changed the image size");

    // Discard takes no flags; unknown write-zeroes flags are unsupported.
    assert_eq!(
        one(&mut fe, T_DISCARD, 0, &seg(0, 8, 1), false).0,
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        one(&mut fe, T_WRITE_ZEROES, 0, &seg(0, 8, 2), false).0,
        VIRTIO_BLK_S_UNSUPP
    );
    // Out of range, and too many segments.
    assert_eq!(
        one(&mut fe, T_WRITE_ZEROES, 0, &seg(SECTORS - 1, 2, 0), false).0,
        VIRTIO_BLK_S_IOERR
    );
    let many: Vec<u8> = (0..33).flat_map(|i| seg(i * 8, 8, 0)).collect();
    assert_eq!(
        one(&mut fe, T_DISCARD, 0, &many, false).0,
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        file_bytes(&b.image, 8 * 512, 8),
        8u64.to_le_bytes(),
        "refused discard ran"
    );
}

#[test]
fn test_config_space_describes_the_disk() {
    let b = start(
        BlkOptions {
            queues: 2,
            ..BlkOptions::default()
        },
        1,
    );
    let mut fe = frontend::connect(&b.served.socket, 2, 64).expect("connect");
    let (_, config) = fe
        .frontend
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .expect("GET_CONFIG");
    let u32_at = |o: usize| u32::from_le_bytes(config[o..o + 4].try_into().expect("4 bytes"));
    assert_eq!(
        u64::from_le_bytes(config[0..8].try_into().expect("8 bytes")),
        SECTORS,
        "capacity"
    );
    assert_eq!(u32_at(12), 254, "seg_max");
    assert_eq!(u32_at(20), 512, "blk_size");
    assert_eq!(
        u16::from_le_bytes([config[34], config[35]]),
        2,
        "num_queues"
    );
    assert!(u32_at(36) > 0 && u32_at(40) > 0, "discard limits");
    assert!(u32_at(48) > 0 && u32_at(52) > 0, "write-zeroes limits");
    let features = fe.frontend.get_features().expect("GET_FEATURES");
    for (bit, name) in [
        (2, "SEG_MAX"),
        (6, "BLK_SIZE"),
        (9, "FLUSH"),
        (12, "MQ"),
        (13, "DISCARD"),
        (14, "WRITE_ZEROES"),
    ] {
        assert!(features & (1 << bit) != 0, "feature {name} not offered");
    }
    assert!(features & (1 << 5) == 0, "RO offered on a writable disk");
}

/// The access mode of the process's descriptor for `image`.
fn open_modes(image: &Path) -> Vec<u32> {
    let image = std::fs::canonicalize(image).expect("canonical");
    let mut modes = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").expect("fds").flatten() {
        if std::fs::read_link(e.path()).ok().as_deref() == Some(image.as_path()) {
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            if let Some(flags) = info.lines().find_map(|l| l.strip_prefix("flags:")) {
                let flags = u32::from_str_radix(flags.trim(), 8).expect("octal flags");
                modes.push(flags & 3);
            }
        }
    }
    modes
}

#[test]
fn test_read_only_disk_refuses_writes_and_never_changes_the_file() {
    let b = start(
        BlkOptions {
            read_only: true,
            ..BlkOptions::default()
        },
        1,
    );
    let modes = open_modes(&b.image);
    assert!(!modes.is_empty(), "image not open");
    assert!(
        modes.iter().all(|m| *m == 0),
        "image open with modes {modes:?}, not O_RDONLY"
    );
    let before = std::fs::read(&b.image).expect("read image");
    let mut fe = frontend::connect(&b.served.socket, 1, 64).expect("connect");
    let features = fe.frontend.get_features().expect("GET_FEATURES");
    assert!(features & (1 << 5) != 0, "RO not offered");
    assert!(
        features & (3 << 13) == 0,
        "discard/write-zeroes offered read-only"
    );

    assert_eq!(
        one(&mut fe, T_OUT, 0, &[0x55; 512], false).0,
        VIRTIO_BLK_S_IOERR
    );
    let seg = [0u8; 16];
    assert_eq!(
        one(&mut fe, T_DISCARD, 0, &seg, false).0,
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        one(&mut fe, T_WRITE_ZEROES, 0, &seg, false).0,
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(one(&mut fe, T_FLUSH, 0, &[], true).0, VIRTIO_BLK_S_OK);
    let (st, _) = one(&mut fe, T_IN, 3, &[0u8; 512], true);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(data(&fe, 0, 512), before[3 * 512..4 * 512]);
    assert_eq!(
        std::fs::read(&b.image).expect("read image"),
        before,
        "file changed"
    );
}

/// (what, type, sector, data, data device-writable, expected status)
type BadCase = (&'static str, u32, u64, Vec<u8>, bool, u8);

#[test]
fn test_bad_requests_get_the_right_status_and_the_device_keeps_serving() {
    let b = start(BlkOptions::default(), 1);
    let mut fe = frontend::connect(&b.served.socket, 1, 128).expect("connect");
    let before = std::fs::read(&b.image).expect("read image");
    let cases: Vec<BadCase> = vec![
        (
            "unknown type",
            99,
            0,
            vec![0; 512],
            true,
            VIRTIO_BLK_S_UNSUPP,
        ),
        (
            "read past the end",
            T_IN,
            SECTORS,
            vec![0; 512],
            true,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "read straddling the end",
            T_IN,
            SECTORS - 1,
            vec![0; 1024],
            true,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "write past the end",
            T_OUT,
            SECTORS,
            vec![1; 512],
            false,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "sector overflows",
            T_IN,
            u64::MAX,
            vec![0; 512],
            true,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "sector * 512 overflows",
            T_OUT,
            u64::MAX / 256,
            vec![1; 512],
            false,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "read of a partial sector",
            T_IN,
            0,
            vec![0; 100],
            true,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "write of a partial sector",
            T_OUT,
            0,
            vec![1; 700],
            false,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "read with driver-readable data",
            T_IN,
            0,
            vec![0; 512],
            false,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "write with device-writable data",
            T_OUT,
            0,
            vec![1; 512],
            true,
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "discard of half a segment",
            T_DISCARD,
            0,
            vec![0; 8],
            false,
            VIRTIO_BLK_S_IOERR,
        ),
    ];
    for (n, (_, kind, sector, data, writable, _)) in cases.iter().enumerate() {
        request(&mut fe, 0, n as u64, *kind, *sector, data, *writable);
    }
    fe.kick(0).expect("kick");
    let used = fe
        .wait_used(0, cases.len() as u16, WAIT)
        .expect("every bad request answered");
    for (n, (what, .., want)) in cases.iter().enumerate() {
        assert_eq!(status(&fe, n as u64), *want, "{what}");
        assert_eq!(used[n].1, 1, "{what}: only the status byte is written");
    }

    // Chains that cannot carry a status, or reach outside guest memory. The
    // malformed ones with a status byte each get a status byte of their own.
    let s = blk_slot(12);
    let (outside_status, long_status) = (s.status + 1, s.status + 2);
    for at in [outside_status, long_status] {
        fe.mem.write_obj(0xffu8, GuestAddress(at)).expect("preset");
    }
    fe.mem
        .write_slice(&blk_header(T_IN, 0), GuestAddress(s.hdr))
        .expect("header");
    let short = {
        fe.mem
            .write_slice(&[0u8; 8], GuestAddress(s.hdr + 0x200))
            .expect("short header");
        fe.add_chain(
            0,
            &[(s.hdr + 0x200, 8, 0), (s.status, 1, VIRTQ_DESC_F_WRITE)],
        )
        .expect("chain")
    };
    let no_status = fe
        .add_chain(0, &[(s.hdr, 16, 0), (s.data, 512, 0)])
        .expect("chain");
    let outside = fe
        .add_chain(
            0,
            &[
                (s.hdr, 16, 0),
                (0x7_0000_0000, 512, VIRTQ_DESC_F_WRITE),
                (outside_status, 1, VIRTQ_DESC_F_WRITE),
            ],
        )
        .expect("chain");
    let absurd = fe
        .add_chain(
            0,
            &[
                (s.hdr, 16, 0),
                (s.data, u32::MAX, VIRTQ_DESC_F_WRITE),
                (s.status, 1, VIRTQ_DESC_F_WRITE),
            ],
        )
        .expect("chain");
    // Longer than a request may be (64 MiB), within 2^32 bytes.
    let long = fe
        .add_chain(
            0,
            &[
                (s.hdr, 16, 0),
                (s.data, 65 << 20, VIRTQ_DESC_F_WRITE),
                (long_status, 1, VIRTQ_DESC_F_WRITE),
            ],
        )
        .expect("chain");
    fe.kick(0).expect("kick");
    let used = fe.wait_used(0, 5, WAIT).expect("answered");
    assert_eq!(used[0], (short, 1), "short header");
    assert_eq!(
        fe.mem
            .read_obj::<u8>(GuestAddress(s.status))
            .expect("status"),
        VIRTIO_BLK_S_IOERR,
        "short header"
    );
    assert_eq!(used[1], (no_status, 0), "no status byte: nothing written");
    // virtio-queue ends a chain where its length passes 2^32 bytes (virtio
    // 1.2, 2.7.5.2), so this one is cut before its status byte.
    assert_eq!(used[3], (absurd, 0), "absurd length");
    // Malformed chains (the vhost-user layer refuses them before the
    // device sees them) whose last byte is writable: IOERR there.
    for ((what, head, at), got) in [
        ("buffer outside guest memory", outside, outside_status),
        ("longer than a request may be", long, long_status),
    ]
    .into_iter()
    .zip([&used[2], &used[4]])
    {
        assert_eq!(*got, (head, 1), "{what}: only the status byte is written");
        assert_eq!(
            fe.mem.read_obj::<u8>(GuestAddress(at)).expect("status"),
            VIRTIO_BLK_S_IOERR,
            "{what}"
        );
    }

    // A descriptor loop: descriptor 100 points at itself. virtio-queue stops
    // following it after the queue size; the answer comes and nothing hangs.
    fe.write_desc(0, 100, s.hdr, 16, frontend::VIRTQ_DESC_F_NEXT, 100)
        .expect("loop");
    fe.push_avail(0, 100).expect("avail");
    fe.kick(0).expect("kick");
    fe.wait_used(0, 1, WAIT).expect("the loop is answered");

    // Still serving, and nothing was written to the image.
    let (st, _) = one(&mut fe, T_IN, 5, &[0u8; 512], true);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(std::fs::read(&b.image).expect("read image"), before);
    assert_eq!(b.served.settled_in_flight(), 0);
}

#[test]
fn test_get_vring_base_waits_for_every_request_in_flight() {
    let b = start(
        BlkOptions {
            latency: Duration::from_millis(200),
            io_threads: 2,
            ..BlkOptions::default()
        },
        1,
    );
    let mut fe = frontend::connect(&b.served.socket, 1, 64).expect("connect");
    for n in 0..6 {
        request(&mut fe, 0, n, T_IN, n * 8, &[0u8; 4096], true);
    }
    fe.kick(0).expect("kick");
    // All 6 popped (the first answer comes after 200 ms): the ring's base
    // is then 6, and the reply must wait for all of them. With fewer
    // popped, a base of 5 would be right, and the test would race.
    until("requests in flight", || b.served.server.in_flight() == 6);
    let base = fe.frontend.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(base, 6, "next avail index");
    assert_eq!(
        fe.used_idx(0).expect("used"),
        6,
        "replied before every used entry was written"
    );
    for n in 0..6 {
        assert_eq!(status(&fe, n), VIRTIO_BLK_S_OK);
        assert_eq!(data(&fe, n, 8), (n * 8).to_le_bytes());
    }
    assert_eq!(b.served.server.in_flight(), 0);
}

#[test]
fn test_rem_mem_reg_is_acked_only_after_the_read_into_it_completed() {
    let b = start(
        BlkOptions {
            latency: Duration::from_millis(500),
            ..BlkOptions::default()
        },
        1,
    );
    let mut fe = frontend::connect(&b.served.socket, 1, 64).expect("connect");
    let file2 = tempfile::tempfile().expect("file");
    file2.set_len(1 << 20).expect("size");
    let region2 = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0x4000_0000),
        1 << 20,
        Some(FileOffset::new(file2, 0)),
    )])
    .expect("map region 2");
    let info2 = region_infos(&region2).expect("info").remove(0);
    fe.frontend.add_mem_region(&info2).expect("ADD_MEM_REG");

    // Header and status in region 1, the data buffer in region 2.
    let s = blk_slot(0);
    fe.mem
        .write_slice(&blk_header(T_IN, 9), GuestAddress(s.hdr))
        .expect("header");
    let head = fe
        .add_chain(
            0,
            &[
                (s.hdr, 16, 0),
                (0x4000_0000, 4096, VIRTQ_DESC_F_WRITE),
                (s.status, 1, VIRTQ_DESC_F_WRITE),
            ],
        )
        .expect("chain");
    fe.kick(0).expect("kick");
    until("request in flight", || b.served.server.in_flight() == 1);
    let asked = Instant::now();
    fe.frontend
        .remove_mem_region(&info2)
        .expect("REM_MEM_REG acked");
    let waited = asked.elapsed();
    assert_eq!(
        fe.used_idx(0).expect("used idx"),
        1,
        "the ack came before the read into the removed region wrote its used entry"
    );
    assert!(
        waited >= Duration::from_millis(200),
        "acked after only {waited:?}"
    );
    assert_eq!(fe.wait_used(0, 1, WAIT).expect("used"), vec![(head, 4097)]);
    let mut buf = [0u8; 8];
    region2
        .read_slice(&mut buf, GuestAddress(0x4000_0000))
        .expect("read");
    assert_eq!(buf, 9u64.to_le_bytes(), "data not written before the ack");
}

#[test]
fn test_every_queue_serves_with_queues_spread_over_workers() {
    let b = start(
        BlkOptions {
            queues: 4,
            ..BlkOptions::default()
        },
        2,
    );
    let mut fe = frontend::connect(&b.served.socket, 4, 64).expect("connect");
    for q in 0..4usize {
        // Slot per queue; queue q writes sector 1000 + q then reads it back.
        let p = pattern(q as u8 + 10, 512);
        request(&mut fe, q, q as u64, T_OUT, 1000 + q as u64, &p, false);
        fe.kick(q).expect("kick");
    }
    for q in 0..4usize {
        let used = fe.wait_used(q, 1, WAIT).expect("used");
        assert_eq!(used.len(), 1);
        assert_eq!(status(&fe, q as u64), VIRTIO_BLK_S_OK, "queue {q}");
        assert_eq!(
            file_bytes(&b.image, (1000 + q as u64) * 512, 512),
            pattern(q as u8 + 10, 512),
            "queue {q}"
        );
        request(
            &mut fe,
            q,
            q as u64,
            T_IN,
            1000 + q as u64,
            &[0u8; 512],
            true,
        );
        fe.kick(q).expect("kick");
        fe.wait_used(q, 1, WAIT).expect("used");
        assert_eq!(
            data(&fe, q as u64, 512),
            pattern(q as u8 + 10, 512),
            "queue {q}"
        );
    }
}

#[test]
fn test_socket_accepts_a_new_frontend_after_a_disconnect_with_io_in_flight() {
    let b = start(
        BlkOptions {
            latency: Duration::from_millis(50),
            ..BlkOptions::default()
        },
        1,
    );
    for round in 0..3u64 {
        let mut fe = frontend::connect(&b.served.socket, 1, 64).expect("connect");
        let p = pattern(round as u8, 512);
        request(&mut fe, 0, 0, T_OUT, round, &p, false);
        request(&mut fe, 0, 1, T_IN, 50, &[0u8; 512], true);
        fe.kick(0).expect("kick");
        if round == 1 {
            // Hang up with both requests in flight.
            until("in flight", || b.served.server.in_flight() > 0);
            drop(fe);
            until("drained after the disconnect", || {
                b.served.server.in_flight() == 0
            });
            continue;
        }
        fe.wait_used(0, 2, WAIT).expect("used");
        assert_eq!(status(&fe, 0), VIRTIO_BLK_S_OK, "round {round}");
        assert_eq!(file_bytes(&b.image, round * 512, 512), p, "round {round}");
    }
}
