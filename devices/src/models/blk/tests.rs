// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Unit tests of virtio-blk on real descriptor chains (see `virtio::mock`).

use switchboard_runtime::{Gate, MessageKind, Seq};

use super::*;
use crate::models::virtio::mock::{
    Completions, Desc, MockDriver, MockGuest, DATA_BASE, HIGH_RAM_BASE,
};

/// Sectors of a test image.
const SECTORS: u64 = 8;
const IMAGE_LEN: usize = (SECTORS * SECTOR_SIZE) as usize;

const HDR: u64 = DATA_BASE;
const BUF0: u64 = DATA_BASE + 0x1000;
const BUF1: u64 = DATA_BASE + 0x2000;
const STATUS: u64 = DATA_BASE + 0x3000;
/// What guest bytes hold before the device writes them.
const STALE: u8 = 0xee;

const OK: u8 = VIRTIO_BLK_S_OK;
const IOERR: u8 = VIRTIO_BLK_S_IOERR;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP;

/// The test image: every byte differs from its neighbours, and every
/// sector from the others.
fn image() -> Vec<u8> {
    (0..IMAGE_LEN)
        .map(|o| (o as u8).wrapping_mul(7) ^ (o / 512) as u8)
        .collect()
}

/// The test image with `range` replaced by `byte`.
fn image_with(range: std::ops::Range<usize>, byte: u8) -> Vec<u8> {
    let mut i = image();
    i[range].fill(byte);
    i
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // reserved: ignored
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A discard / write-zeroes segment.
fn seg(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// How the device answered.
#[derive(Debug, PartialEq, Eq)]
enum How {
    /// On the queue worker, from `handle`.
    AtOnce,
    /// Later, through the completer (after `end_batch`).
    Later,
}

/// A disk on a test image, and a guest to drive it.
struct T {
    /// The image; removed when dropped.
    file: tempfile::NamedTempFile,
    blk: Blk,
    guest: MockGuest,
}

impl T {
    fn open(read_only: bool, serial: Option<&str>) -> Self {
        let file = tempfile::NamedTempFile::new().expect("temp image");
        std::fs::write(file.path(), image()).expect("write the image");
        let options = BlkOptions {
            read_only,
            io_threads: 1,
            serial: serial.map(str::to_string),
            ..BlkOptions::default()
        };
        let blk = Blk::open(file.path(), &options).expect("open the image");
        T {
            file,
            blk,
            guest: MockGuest::new(),
        }
    }

    fn rw() -> Self {
        T::open(false, Some("disk-7"))
    }

    fn ro() -> Self {
        T::open(true, None)
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(self.file.path()).expect("read the image")
    }

    /// Hands the one request offered on `driver` to the device as the
    /// server does; returns it answered, its used length and how.
    fn submit(&self, driver: &mut MockDriver<'_>, done: &Completions) -> (Request, u32, How) {
        let answer = match self.blk.handle(driver.walk_one(), done.completer()) {
            Handled::Done { request, len } => (request, len, How::AtOnce),
            Handled::Pending => {
                self.blk.end_batch(driver.index());
                let (request, len) = done.next();
                (request, len, How::Later)
            }
        };
        assert!(done.drain().is_empty(), "answered once");
        answer
    }

    /// Runs the chain `descs` (direct or `indirect`); returns the byte
    /// at [`STATUS`], the used length and how the device answered.
    fn chain(&self, descs: &[Desc], indirect: bool) -> (u8, u32, How) {
        let mut driver = MockDriver::new(&self.guest, 0);
        let done = Completions::new();
        self.guest.fill(STATUS, 1, STALE);
        if indirect {
            driver.add_indirect_chain(descs);
        } else {
            driver.add_chain(descs);
        }
        let (request, len, how) = self.submit(&mut driver, &done);
        driver.finish(request, len);
        (self.guest.read(STATUS, 1)[0], len, how)
    }

    /// Runs a request of type `kind` at `sector`: the header at
    /// [`HDR`], then `data`, then the status byte at [`STATUS`].
    fn req(&self, kind: u32, sector: u64, data: &[Desc]) -> (u8, u32, How) {
        self.guest.write(HDR, &header(kind, sector));
        let mut descs = vec![Desc::r(HDR, 16)];
        descs.extend_from_slice(data);
        descs.push(Desc::w(STATUS, 1));
        self.chain(&descs, false)
    }

    /// Runs a request whose data is `payload`, readable at [`BUF0`];
    /// returns the status and used length.
    fn out(&self, kind: u32, sector: u64, payload: &[u8]) -> (u8, u32) {
        self.guest.write(BUF0, payload);
        let data = [Desc::r(BUF0, payload.len() as u32)];
        let n = usize::from(!payload.is_empty());
        let (status, len, _) = self.req(kind, sector, &data[..n]);
        (status, len)
    }
}

#[test]
fn test_read_copies_image_sectors_into_the_data_buffers() {
    let t = T::rw();
    let data = [Desc::w(BUF0, 512), Desc::w(BUF1, 512)];
    assert_eq!(t.req(VIRTIO_BLK_T_IN, 2, &data), (OK, 1025, How::Later));
    assert_eq!(t.guest.read(BUF0, 512), &image()[1024..1536]);
    assert_eq!(t.guest.read(BUF1, 512), &image()[1536..2048]);
}

#[test]
fn test_read_with_the_status_in_the_last_data_buffer() {
    // The status is the last writable byte, wherever it is.
    let t = T::rw();
    t.guest.write(HDR, &header(VIRTIO_BLK_T_IN, 7));
    t.guest.fill(STATUS - 512, 513, STALE);
    let got = t.chain(&[Desc::r(HDR, 16), Desc::w(STATUS - 512, 513)], false);
    assert_eq!(got, (OK, 513, How::Later));
    assert_eq!(t.guest.read(STATUS - 512, 512), &image()[3584..]);
}

#[test]
fn test_header_split_over_two_buffers_is_read_whole() {
    let t = T::rw();
    let h = header(VIRTIO_BLK_T_IN, 1);
    t.guest.write(HDR, &h[..10]);
    t.guest.write(HIGH_RAM_BASE, &h[10..]);
    let descs = [
        Desc::r(HDR, 10),
        Desc::r(HIGH_RAM_BASE, 6),
        Desc::w(BUF0, 512),
        Desc::w(STATUS, 1),
    ];
    assert_eq!(t.chain(&descs, false), (OK, 513, How::Later));
    assert_eq!(t.guest.read(BUF0, 512), &image()[512..1024]);
}

#[test]
fn test_write_lands_in_the_image() {
    let t = T::rw();
    let data: Vec<u8> = (0..512).map(|i| (i as u8) ^ 0x5a).collect();
    assert_eq!(t.out(VIRTIO_BLK_T_OUT, 3, &data), (OK, 1));
    let mut expected = image();
    expected[1536..2048].copy_from_slice(&data);
    assert_eq!(t.image(), expected);
}

#[test]
fn test_write_through_an_indirect_chain_lands_in_the_image() {
    let t = T::rw();
    t.guest.write(HDR, &header(VIRTIO_BLK_T_OUT, 0));
    t.guest.fill(BUF0, 256, 0x11);
    t.guest.fill(HIGH_RAM_BASE, 768, 0x22);
    let descs = [
        Desc::r(HDR, 16),
        Desc::r(BUF0, 256),
        Desc::r(HIGH_RAM_BASE, 768),
        Desc::w(STATUS, 1),
    ];
    assert_eq!(t.chain(&descs, true), (OK, 1, How::Later));
    let mut expected = image_with(0..256, 0x11);
    expected[256..1024].fill(0x22);
    assert_eq!(t.image(), expected);
}

#[test]
fn test_write_with_header_and_data_in_one_buffer_lands_in_the_image() {
    // No layout is assumed: the data is what follows the 16 header
    // bytes, in the same buffer or not.
    let t = T::rw();
    t.guest.write(HDR, &header(VIRTIO_BLK_T_OUT, 1));
    t.guest.fill(HDR + 16, 512, 0x44);
    let got = t.chain(&[Desc::r(HDR, 528), Desc::w(STATUS, 1)], false);
    assert_eq!(got, (OK, 1, How::Later));
    assert_eq!(t.image(), image_with(512..1024, 0x44));
}

#[test]
fn test_flush_answers_ok_from_the_io_pool() {
    let t = T::rw();
    assert_eq!(t.req(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1, How::Later));
    assert_eq!(t.image(), image());
}

#[test]
fn test_flush_on_a_read_only_device_answers_ok_at_once() {
    let t = T::ro();
    assert_eq!(t.req(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1, How::AtOnce));
}

#[test]
fn test_get_id_writes_the_serial_padded_with_zeroes() {
    let t = T::rw();
    t.guest.fill(BUF0, ID_LEN, STALE);
    let got = t.req(VIRTIO_BLK_T_GET_ID, 0, &[Desc::w(BUF0, 20)]);
    assert_eq!(got, (OK, 21, How::AtOnce));
    assert_eq!(
        t.guest.read(BUF0, ID_LEN),
        b"disk-7\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
    );
}

#[test]
fn test_get_id_into_a_short_buffer_writes_what_fits() {
    let t = T::rw();
    t.guest.fill(BUF0, 8, STALE);
    let got = t.req(VIRTIO_BLK_T_GET_ID, 0, &[Desc::w(BUF0, 4)]);
    assert_eq!(got, (OK, 5, How::AtOnce));
    assert_eq!(t.guest.read(BUF0, 8), b"disk\xee\xee\xee\xee");
}

#[test]
fn test_get_id_defaults_to_the_image_file_name() {
    let t = T::ro();
    t.req(VIRTIO_BLK_T_GET_ID, 0, &[Desc::w(BUF0, 20)]);
    let name = t.file.path().file_name().expect("a file name");
    let mut id = name.to_string_lossy().into_owned().into_bytes();
    id.resize(ID_LEN, 0);
    assert_eq!(t.guest.read(BUF0, ID_LEN), id);
}

#[test]
fn test_write_zeroes_zeroes_the_range_and_nothing_else() {
    let t = T::rw();
    let got = t.out(VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg(1, 2, 0));
    assert_eq!(got, (OK, 1));
    assert_eq!(t.image(), image_with(512..1536, 0));
}

#[test]
fn test_write_zeroes_with_unmap_zeroes_each_range_and_keeps_the_size() {
    let t = T::rw();
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let segs = [seg(5, 1, unmap), seg(0, 1, 0)].concat();
    assert_eq!(t.out(VIRTIO_BLK_T_WRITE_ZEROES, 0, &segs), (OK, 1));
    let mut expected = image_with(0..512, 0);
    expected[2560..3072].fill(0);
    assert_eq!(t.image(), expected);
}

#[test]
fn test_write_zeroes_of_zero_sectors_answers_ok() {
    let t = T::rw();
    assert_eq!(t.out(VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg(2, 0, 0)), (OK, 1));
    assert_eq!(t.image(), image());
}

#[test]
fn test_discard_answers_ok_and_keeps_the_sectors_around_it() {
    let t = T::rw();
    assert_eq!(t.out(VIRTIO_BLK_T_DISCARD, 0, &seg(2, 1, 0)), (OK, 1));
    let (got, image) = (t.image(), image());
    assert_eq!(got.len(), IMAGE_LEN);
    assert_eq!(&got[..1024], &image[..1024]);
    assert_eq!(&got[1536..], &image[1536..]);
    // A hint: the sector is either deallocated (reads zero) or kept.
    let sector = &got[1024..1536];
    assert!(sector == &image[1024..1536] || sector.iter().all(|b| *b == 0));
}

#[test]
fn test_discard_of_zero_sectors_answers_ok() {
    // Write-zeroes of zero sectors answers OK; so must a discard (a hint
    // covering nothing).
    let t = T::rw();
    assert_eq!(t.out(VIRTIO_BLK_T_DISCARD, 0, &seg(2, 0, 0)), (OK, 1));
    assert_eq!(t.image(), image());
}

#[test]
fn test_discard_with_a_flag_is_unsupp_and_leaves_the_image() {
    let t = T::rw();
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let got = t.out(VIRTIO_BLK_T_DISCARD, 0, &seg(2, 1, unmap));
    assert_eq!(got, (UNSUPP, 1));
    assert_eq!(t.image(), image());
}

#[test]
fn test_write_zeroes_with_an_unknown_flag_is_unsupp() {
    let t = T::rw();
    let got = t.out(VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg(2, 1, 2));
    assert_eq!(got, (UNSUPP, 1));
    assert_eq!(t.image(), image());
}

#[test]
fn test_discard_of_more_than_max_segments_is_unsupp() {
    let t = T::rw();
    let segs = seg(0, 1, 0).repeat(MAX_DISCARD_SEG as usize + 1);
    assert_eq!(t.out(VIRTIO_BLK_T_DISCARD, 0, &segs), (UNSUPP, 1));
}

#[test]
fn test_discard_without_segments_is_ioerr() {
    let t = T::rw();
    assert_eq!(t.out(VIRTIO_BLK_T_DISCARD, 0, &[]), (IOERR, 1));
}

#[test]
fn test_write_zeroes_with_a_partial_segment_is_ioerr() {
    let t = T::rw();
    let got = t.out(VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg(1, 1, 0)[..12]);
    assert_eq!(got, (IOERR, 1));
    assert_eq!(t.image(), image());
}

#[test]
fn test_write_zeroes_past_the_end_is_ioerr() {
    let t = T::rw();
    let got = t.out(VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg(SECTORS - 1, 2, 0));
    assert_eq!(got, (IOERR, 1));
    assert_eq!(t.image(), image());
}

#[test]
fn test_write_zeroes_of_more_than_max_sectors_is_ioerr() {
    let t = T::rw();
    let too_many = seg(0, MAX_DISCARD_SECTORS + 1, 0);
    assert_eq!(t.out(VIRTIO_BLK_T_WRITE_ZEROES, 0, &too_many), (IOERR, 1));
}

#[test]
fn test_unknown_request_type_is_unsupp_at_once() {
    let t = T::rw();
    assert_eq!(t.req(99, 0, &[]), (UNSUPP, 1, How::AtOnce));
}

#[test]
fn test_short_header_is_ioerr() {
    let t = T::rw();
    t.guest.write(HDR, &header(VIRTIO_BLK_T_FLUSH, 0));
    let got = t.chain(&[Desc::r(HDR, 15), Desc::w(STATUS, 1)], false);
    assert_eq!(got, (IOERR, 1, How::AtOnce));
}

#[test]
fn test_read_past_the_end_is_ioerr_and_writes_no_data() {
    let t = T::rw();
    t.guest.fill(BUF0, 1024, STALE);
    let got = t.req(VIRTIO_BLK_T_IN, SECTORS - 1, &[Desc::w(BUF0, 1024)]);
    assert_eq!(got, (IOERR, 1, How::AtOnce));
    assert_eq!(t.guest.read(BUF0, 1024), vec![STALE; 1024]);
}

#[test]
fn test_read_at_a_sector_whose_offset_overflows_is_ioerr() {
    let t = T::rw();
    let got = t.req(VIRTIO_BLK_T_IN, u64::MAX / 256, &[Desc::w(BUF0, 512)]);
    assert_eq!(got, (IOERR, 1, How::AtOnce));
}

#[test]
fn test_read_of_a_partial_sector_is_ioerr() {
    let t = T::rw();
    let got = t.req(VIRTIO_BLK_T_IN, 0, &[Desc::w(BUF0, 100)]);
    assert_eq!(got, (IOERR, 1, How::AtOnce));
}

#[test]
fn test_read_with_driver_written_data_is_ioerr() {
    let t = T::rw();
    assert_eq!(t.out(VIRTIO_BLK_T_IN, 0, &[0u8; 512]), (IOERR, 1));
}

#[test]
fn test_write_with_device_writable_data_is_ioerr() {
    let t = T::rw();
    let got = t.req(VIRTIO_BLK_T_OUT, 0, &[Desc::w(BUF0, 512)]);
    assert_eq!(got, (IOERR, 1, How::AtOnce));
    assert_eq!(t.image(), image());
}

#[test]
fn test_write_of_a_partial_sector_is_ioerr() {
    let t = T::rw();
    assert_eq!(t.out(VIRTIO_BLK_T_OUT, 0, &[1u8; 511]), (IOERR, 1));
    assert_eq!(t.image(), image());
}

#[test]
fn test_write_on_a_read_only_device_is_ioerr_and_leaves_the_image() {
    let t = T::ro();
    assert_eq!(t.out(VIRTIO_BLK_T_OUT, 0, &[1u8; 512]), (IOERR, 1));
    assert_eq!(t.image(), image());
}

#[test]
fn test_discard_and_write_zeroes_on_a_read_only_device_are_unsupp() {
    let t = T::ro();
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        assert_eq!(t.out(kind, 0, &seg(0, 1, 0)), (UNSUPP, 1), "type {kind}");
    }
    assert_eq!(t.image(), image());
}

#[test]
fn test_request_without_a_status_byte_is_answered_with_length_zero() {
    let t = T::rw();
    t.guest.write(HDR, &header(VIRTIO_BLK_T_OUT, 0));
    let got = t.chain(&[Desc::r(HDR, 16), Desc::r(BUF0, 512)], false);
    assert_eq!((got.1, got.2), (0, How::AtOnce));
    assert_eq!(t.image(), image());
}

#[test]
fn test_request_on_a_queue_the_device_lacks_is_ioerr() {
    let t = T::rw();
    let mut driver = MockDriver::new(&t.guest, 5);
    let done = Completions::new();
    t.guest.write(HDR, &header(VIRTIO_BLK_T_FLUSH, 0));
    driver.add_chain(&[Desc::r(HDR, 16), Desc::w(STATUS, 1)]);
    let (request, len, how) = t.submit(&mut driver, &done);
    driver.finish(request, len);
    assert_eq!((len, how), (1, How::AtOnce));
    assert_eq!(t.guest.read(STATUS, 1), [IOERR]);
}

#[test]
fn test_batch_through_the_gate_is_answered_once_each_and_drains() {
    let t = T::rw();
    let mut driver = MockDriver::new(&t.guest, 0);
    let done = Completions::new();
    let gate = Gate::running("t", 1, 16);
    // Four requests, each with its own header and status byte.
    let (hdr, status) = (|i: u64| HDR + 0x100 * i, |i: u64| STATUS + i);
    t.guest.fill(STATUS, 4, STALE);
    t.guest.fill(BUF1, 512, 0x77);
    for (i, (kind, sector)) in [(VIRTIO_BLK_T_IN, 4), (VIRTIO_BLK_T_OUT, 6)]
        .into_iter()
        .chain([(VIRTIO_BLK_T_GET_ID, 0), (42, 0)])
        .enumerate()
    {
        t.guest.write(hdr(i as u64), &header(kind, sector));
    }
    let heads = [
        driver.add_chain(&[
            Desc::r(hdr(0), 16),
            Desc::w(BUF0, 512),
            Desc::w(status(0), 1),
        ]),
        driver.add_indirect_chain(&[
            Desc::r(hdr(1), 16),
            Desc::r(BUF1, 512),
            Desc::w(status(1), 1),
        ]),
        driver.add_chain(&[
            Desc::r(hdr(2), 16),
            Desc::w(HIGH_RAM_BASE, 20),
            Desc::w(status(2), 1),
        ]),
        driver.add_chain(&[Desc::r(hdr(3), 16), Desc::w(status(3), 1)]),
    ];
    let mut pending = 0;
    for (seq, w) in (1..).zip(driver.walk()) {
        let mut request = w.request.expect("well formed");
        let ticket = gate.admit(0, Seq(seq), MessageKind::Request);
        request.admitted(ticket.expect("admitted"), done.completer(), Some(IOERR));
        match t.blk.handle(request, done.completer()) {
            Handled::Done { request, len } => driver.finish(request, len),
            Handled::Pending => pending += 1,
        }
    }
    assert_eq!(pending, 2, "the read and the write go to the I/O pool");
    assert_eq!(gate.in_flight(), 2);
    t.blk.end_batch(0);
    for _ in 0..pending {
        let (request, len) = done.next();
        driver.finish(request, len);
    }
    assert_eq!(gate.in_flight(), 0);
    assert!(done.drain().is_empty(), "nothing answered twice");
    let mut used = driver.used();
    // The pool answers in its own order, after those answered at once.
    used[2..].sort();
    let h = |i: usize| u32::from(heads[i]);
    assert_eq!(used, [(h(2), 21), (h(3), 1), (h(0), 513), (h(1), 1)]);
    assert_eq!(t.guest.read(STATUS, 4), [OK, OK, OK, UNSUPP]);
    assert_eq!(t.guest.read(BUF0, 512), &image()[2048..2560]);
    assert_eq!(t.guest.read(HIGH_RAM_BASE, 6), b"disk-7");
    assert_eq!(t.image(), image_with(3072..3584, 0x77));
    assert_eq!(t.guest.leases(), [0, 0]);
}

#[test]
fn test_staged_request_dropped_with_the_device_is_answered_with_ioerr() {
    let T { file, blk, guest } = T::rw();
    let mut driver = MockDriver::new(&guest, 0);
    let done = Completions::new();
    let gate = Gate::running("t", 1, 16);
    guest.write(HDR, &header(VIRTIO_BLK_T_IN, 0));
    guest.fill(BUF0, 512, STALE);
    let head = driver.add_chain(&[Desc::r(HDR, 16), Desc::w(BUF0, 512), Desc::w(STATUS, 1)]);
    let mut request = driver.walk_one();
    let ticket = gate.admit(0, Seq(1), MessageKind::Request);
    request.admitted(
        ticket.expect("admitted"),
        done.completer(),
        blk.fail_status(),
    );
    assert!(matches!(
        blk.handle(request, done.completer()),
        Handled::Pending
    ));
    // The device goes before its batch ends (a panic between `handle`
    // and `end_batch`, say): the staged request answers itself.
    drop(blk);
    let (request, len) = done.next();
    assert!(done.drain().is_empty(), "answered once");
    assert_eq!((request.head(), len), (head, 1));
    assert_eq!(guest.read(STATUS, 1), [IOERR]);
    assert_eq!(guest.read(BUF0, 512), vec![STALE; 512], "no data read");
    assert_eq!(gate.in_flight(), 1, "held until the used entry is written");
    driver.finish(request, len);
    assert_eq!(gate.in_flight(), 0);
    assert_eq!(driver.used(), [(u32::from(head), 1)]);
    drop(file);
}

#[test]
fn test_read_only_device_offers_ro_and_neither_discard_nor_write_zeroes() {
    let t = T::ro();
    let f = t.blk.device_features();
    assert_eq!(f & VIRTIO_BLK_F_RO, VIRTIO_BLK_F_RO);
    assert_eq!(f & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_eq!(&t.blk.config()[36..60], &[0u8; 24], "no discard limits");
}

#[test]
fn test_config_space_describes_the_image() {
    let t = T::rw();
    let c = t.blk.config();
    assert_eq!(c.len(), CONFIG_LEN);
    assert_eq!(c[0..8], SECTORS.to_le_bytes());
    assert_eq!(c[12..16], 254u32.to_le_bytes(), "seg_max: queue size - 2");
    assert_eq!(c[20..24], 512u32.to_le_bytes());
    assert_eq!(c[34..36], 1u16.to_le_bytes());
    assert_eq!(c[36..40], MAX_DISCARD_SECTORS.to_le_bytes());
    assert_eq!(c[40..44], MAX_DISCARD_SEG.to_le_bytes());
    assert_eq!(c[56], 1);
    let f = t.blk.device_features();
    let rw = VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
    assert_eq!(f & (rw | VIRTIO_BLK_F_RO), rw);
}
