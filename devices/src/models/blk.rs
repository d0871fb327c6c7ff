// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-blk (virtio 1.2, 5.2) on a raw image file.
//!
//! # Requests
//!
//! A request's readable buffers start with the 16-byte header (type,
//! reserved, sector); its writable buffers end with the status byte. What
//! lies between is the data: writable for reads and GET_ID, readable for
//! writes, discard and write-zeroes. Every request is checked on the queue
//! worker before any I/O starts; one that fails a check is
//! answered at once with `IOERR` or `UNSUPP` in its status byte. A chain
//! without a writable byte has nowhere to put a status: it is answered with
//! a used length of 0 and logged.
//!
//! # I/O
//!
//! File I/O never runs on the queue worker (the ring walker): requests are
//! staged per queue while a kick's batch is walked, then handed to a
//! bounded pool of I/O threads in one go ([`VirtioDevice::end_batch`]). An
//! I/O thread does the file operation, copies between the file and guest
//! memory through the request's leases, writes the status byte and sends
//! the request back through the [`Completer`]. The pool's threads end when
//! the device is dropped, after finishing every job they were given.
//!
//! # Read-only
//!
//! A read-only device opens its image `O_RDONLY`, offers `VIRTIO_BLK_F_RO`
//! and neither discard nor write-zeroes, and answers writes, discards and
//! write-zeroes with `IOERR` without touching the file.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use rustix::fs::FallocateFlags;

use crate::models::virtio::{ChainError, Completer, Handled, Request, VirtioDevice};

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Bytes per virtio-blk sector (fixed by the spec, whatever `blk_size` is).
pub const SECTOR_SIZE: u64 = 512;

/// Maximum number of segments in a request (`seg_max`).
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// The device is read-only.
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `blk_size` is valid.
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// FLUSH is supported.
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// `num_queues` is valid.
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// DISCARD is supported.
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
/// WRITE_ZEROES is supported.
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types (virtio 1.2, 5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_T_DISCARD: u32 = 11;
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// The request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// The request is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The `unmap` flag of a write-zeroes segment.
const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Bytes of the request header.
const HEADER_LEN: u64 = 16;
/// Bytes of one discard / write-zeroes segment.
const SEGMENT_LEN: u64 = 16;
/// The device kind, as in a topology file and in logs.
pub const KIND: &str = "virtio-blk";

/// Bytes of the device ID answered to GET_ID, and so the longest serial.
pub const ID_LEN: usize = 20;

/// Most virtqueues a disk may have.
pub const MAX_QUEUES: u16 = 64;

/// Sectors one discard or write-zeroes segment may cover (2 GiB - 512).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 22) - 1;
/// Segments one discard or write-zeroes request may carry.
pub const MAX_DISCARD_SEG: u32 = 32;

/// Bytes of the configuration space served (up to `unused1`, virtio 1.2
/// 5.2.4; the secure-erase fields are not offered).
pub const CONFIG_LEN: usize = 60;

/// Zeroes written per `pwrite` when the file system cannot zero a range.
const ZERO_CHUNK: usize = 1 << 20;

/// Errors opening a block device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image could not be opened.
    #[error("Open the image {path} {mode}")]
    Open {
        /// The image.
        path: PathBuf,
        /// "read-only" or "read-write".
        mode: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image is not a regular file.
    #[error("The image {path} is not a regular file")]
    NotAFile {
        /// The image.
        path: PathBuf,
    },
    /// The image holds less than one sector.
    #[error("The image {path} is {size} bytes, smaller than one 512-byte sector")]
    TooSmall {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A bad option.
    #[error("Invalid block device option: {0}")]
    Option(String),
    /// Starting an I/O thread failed.
    #[error("Start an I/O thread")]
    Thread(#[source] io::Error),
}

/// How to serve an image.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    /// Open the image read-only; writes fail with `IOERR`.
    pub read_only: bool,
    /// Number of virtqueues (1..=64).
    pub queues: u16,
    /// Largest queue size accepted (a power of two, 2..=32768).
    pub queue_size: u16,
    /// I/O threads (1..=64).
    pub io_threads: usize,
    /// The ID answered to GET_ID (at most 20 bytes); default: the image's
    /// file name, cut to 20 bytes.
    pub serial: Option<String>,
    /// Latency added to every file operation, to emulate a slow disk
    /// (tests of draining and of in-flight recovery use it): each
    /// operation waits this long plus a pseudo-random part of as much
    /// again, so that requests on several I/O threads complete out of
    /// order. Zero by default.
    pub latency: std::time::Duration,
    /// With `latency`: every Nth file operation (counted over the device's
    /// I/O threads) waits ten times `latency` instead, so that at any
    /// moment some request is held while later ones complete (a test of
    /// in-flight recovery needs completions out of order at the instant a
    /// backend is killed). Zero, the default: none.
    pub latency_slow_every: u64,
    /// **Test only**: makes the request handler panic (see [`PanicFault`]).
    pub test_panic: Option<Arc<PanicFault>>,
}

/// **Test only**: a fault that makes virtio-blk's request handler panic,
/// to show containment and supervised restart. Shared by every device
/// built from the same options (a restarted device counts on).
#[derive(Debug)]
pub struct PanicFault {
    /// The request (counted from 1 over every device built from these
    /// options) that panics.
    pub at: u64,
    /// Panic on every request from `at` on, not once.
    pub every: bool,
    seen: std::sync::atomic::AtomicU64,
}

impl PanicFault {
    /// A fault at request `at`, once or on every request from then.
    pub fn new(at: u64, every: bool) -> Self {
        PanicFault {
            at,
            every,
            seen: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn check(&self) {
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n == self.at || (self.every && n > self.at) {
            panic!(
                "test fault: virtio-blk request {n} panics (--test-panic-at {})",
                self.at
            );
        }
    }
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            read_only: false,
            queues: 1,
            queue_size: 256,
            io_threads: 4,
            serial: None,
            latency: std::time::Duration::ZERO,
            latency_slow_every: 0,
            test_panic: None,
        }
    }
}

/// A checked request, ready for the I/O pool.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// Read `len` bytes at byte `offset` of the image into the writable data.
    Read { offset: u64, len: usize },
    /// Write the readable data (`len` bytes after the header) at `offset`.
    Write { offset: u64, len: usize },
    /// Make written data durable.
    Flush,
    /// Deallocate byte ranges `(offset, len)` (a hint).
    Discard(Vec<(u64, u64)>),
    /// Zero byte ranges `(offset, len, unmap)`.
    WriteZeroes(Vec<(u64, u64, bool)>),
}

/// What a checked request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Parsed {
    /// File I/O, on the pool.
    Io(Op),
    /// Nothing more: answer OK with `len` data bytes written.
    Done { len: u64 },
}

/// A request handed to the I/O pool.
struct Job {
    request: Request,
    op: Op,
    /// Offset of the status byte among the writable bytes.
    status_at: u64,
    done: Completer,
}

/// Jobs waiting for an I/O thread.
#[derive(Default)]
struct PoolQueue {
    jobs: VecDeque<Job>,
    closed: bool,
}

#[derive(Default)]
struct PoolShared {
    queue: Mutex<PoolQueue>,
    ready: Condvar,
    /// File operations taken, for [`BlkOptions::latency_slow_every`].
    taken: std::sync::atomic::AtomicU64,
}

impl PoolShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The virtio-blk device.
pub struct Blk {
    path: PathBuf,
    read_only: bool,
    /// Capacity in 512-byte sectors.
    capacity: u64,
    queues: u16,
    queue_size: u16,
    id: [u8; ID_LEN],
    /// Requests of the current batch, per queue.
    staged: Vec<Mutex<Vec<Job>>>,
    pool: Arc<PoolShared>,
    threads: Vec<thread::JoinHandle<()>>,
    io_threads: usize,
    /// A replayed device: no image, no I/O threads; `end_batch` runs the
    /// staged jobs on the caller's thread against their recordings.
    replay: bool,
    /// The data buffer of a replayed device's jobs, kept from batch to
    /// batch: a fresh one would be zero-filled for every request.
    replay_buf: Mutex<Vec<u8>>,
    test_panic: Option<Arc<PanicFault>>,
}

/// What replay needs to rebuild a [`Blk`] (the log header holds it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlkRebuild {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Read-only.
    pub read_only: bool,
    /// Virtqueues.
    pub queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// The GET_ID answer (up to 20 bytes).
    pub serial: String,
}

impl std::fmt::Debug for Blk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blk")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .field("capacity", &self.capacity)
            .field("queues", &self.queues)
            .finish()
    }
}

impl Blk {
    /// Opens `path` and starts the I/O threads. The image's size must be at
    /// least one sector; a trailing partial sector is not served.
    pub fn open(path: &Path, options: &BlkOptions) -> Result<Self, Error> {
        if !(1..=MAX_QUEUES).contains(&options.queues) {
            return Err(Error::Option(format!(
                "queues must be 1 to {MAX_QUEUES}, not {}",
                options.queues
            )));
        }
        if !options.queue_size.is_power_of_two() || options.queue_size < 2 {
            return Err(Error::Option(format!(
                "queue size must be a power of two from 2 to 32768, not {}",
                options.queue_size
            )));
        }
        if !(1..=64).contains(&options.io_threads) {
            return Err(Error::Option(format!(
                "I/O threads must be 1 to 64, not {}",
                options.io_threads
            )));
        }
        let mode = if options.read_only {
            "read-only"
        } else {
            "read-write"
        };
        // A directory would fail to open read-write with a less clear error.
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(Error::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                mode,
                source,
            })?;
        let meta = file.metadata().map_err(|source| Error::Open {
            path: path.to_path_buf(),
            mode,
            source,
        })?;
        if !meta.is_file() {
            return Err(Error::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let capacity = meta.len() / SECTOR_SIZE;
        if capacity == 0 {
            return Err(Error::TooSmall {
                path: path.to_path_buf(),
                size: meta.len(),
            });
        }
        if meta.len() % SECTOR_SIZE != 0 {
            tracing::warn!(
                path = %path.display(),
                size = meta.len(),
                "the image's last {} bytes are not a whole sector and are not served",
                meta.len() % SECTOR_SIZE
            );
        }
        let serial = match &options.serial {
            Some(s) if s.len() > ID_LEN => {
                return Err(Error::Option(format!(
                    "serial {s:?} is {} bytes, more than {ID_LEN}",
                    s.len()
                )))
            }
            Some(s) => s.clone(),
            None => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);

        let file = Arc::new(file);
        let pool = Arc::new(PoolShared::default());
        let threads = (0..options.io_threads)
            .map(|i| {
                let (pool, file) = (Arc::clone(&pool), Arc::clone(&file));
                let latency = Latency {
                    base: options.latency,
                    slow_every: options.latency_slow_every,
                };
                thread::Builder::new()
                    .name(format!("blk-io{i}"))
                    .spawn(move || io_thread(&pool, &file, latency))
                    .map_err(Error::Thread)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Blk {
            path: path.to_path_buf(),
            read_only: options.read_only,
            capacity,
            queues: options.queues,
            queue_size: options.queue_size,
            id,
            staged: (0..options.queues).map(|_| Mutex::default()).collect(),
            pool,
            threads,
            io_threads: options.io_threads,
            replay: false,
            replay_buf: Mutex::default(),
            test_panic: options.test_panic.clone(),
        })
    }

    /// What replay needs to rebuild this device.
    pub fn rebuild_info(&self) -> BlkRebuild {
        let n = self.id.iter().position(|b| *b == 0).unwrap_or(ID_LEN);
        BlkRebuild {
            capacity: self.capacity,
            read_only: self.read_only,
            queues: self.queues,
            queue_size: self.queue_size,
            serial: String::from_utf8_lossy(&self.id[..n]).into_owned(),
        }
    }

    /// A device rebuilt for replay: same geometry and answers, no image and
    /// no I/O threads.
    pub fn replay(info: &BlkRebuild) -> Result<Self, Error> {
        if !(1..=MAX_QUEUES).contains(&info.queues) || info.queue_size < 2 || info.capacity == 0 {
            return Err(Error::Option(format!(
                "cannot rebuild a disk from {info:?}"
            )));
        }
        if info.serial.len() > ID_LEN {
            return Err(Error::Option(format!(
                "serial {:?} is more than {ID_LEN} bytes",
                info.serial
            )));
        }
        let mut id = [0u8; ID_LEN];
        id[..info.serial.len()].copy_from_slice(info.serial.as_bytes());
        Ok(Blk {
            path: PathBuf::new(),
            read_only: info.read_only,
            capacity: info.capacity,
            queues: info.queues,
            queue_size: info.queue_size,
            id,
            staged: (0..info.queues).map(|_| Mutex::default()).collect(),
            pool: Arc::new(PoolShared::default()),
            threads: Vec::new(),
            io_threads: 1,
            replay: true,
            replay_buf: Mutex::default(),
            test_panic: None,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that `len` bytes at `sector` are inside the image; returns
    /// the byte offset.
    fn range(&self, sector: u64, len: u64) -> Result<u64, u8> {
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(VIRTIO_BLK_S_IOERR)?;
        let end = offset.checked_add(len).ok_or(VIRTIO_BLK_S_IOERR)?;
        if end > self.capacity * SECTOR_SIZE {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        Ok(offset)
    }

    /// Reads the segments of a discard or write-zeroes request.
    fn segments(&self, request: &mut Request, discard: bool) -> Result<Op, u8> {
        let payload = request.readable_len() - HEADER_LEN;
        if payload == 0 || payload % SEGMENT_LEN != 0 {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let count = payload / SEGMENT_LEN;
        if count > u64::from(MAX_DISCARD_SEG) {
            return Err(VIRTIO_BLK_S_UNSUPP);
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for i in 0..count {
            let mut seg = [0u8; SEGMENT_LEN as usize];
            request
                .read_at(HEADER_LEN + i * SEGMENT_LEN, &mut seg)
                .map_err(|_| VIRTIO_BLK_S_IOERR)?;
            let sector = u64::from_le_bytes(le_bytes(&seg[0..8]));
            let sectors = u32::from_le_bytes(le_bytes(&seg[8..12]));
            let flags = u32::from_le_bytes(le_bytes(&seg[12..16]));
            // Discard takes no flags; write-zeroes only `unmap`.
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return Err(VIRTIO_BLK_S_UNSUPP);
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let offset = self.range(sector, len)?;
            ranges.push((offset, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0));
        }
        Ok(if discard {
            Op::Discard(ranges.into_iter().map(|(o, l, _)| (o, l)).collect())
        } else {
            Op::WriteZeroes(ranges)
        })
    }

    /// Checks a request (which has at least one writable byte, its status)
    /// and says what to do; `Err` is the status to answer at once.
    /// GET_ID is answered here, its ID written.
    fn parse(&self, request: &mut Request) -> Result<Parsed, u8> {
        if request.readable_len() < HEADER_LEN {
            request.set_kind("short-header");
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let mut header = [0u8; HEADER_LEN as usize];
        request
            .read_at(0, &mut header)
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let kind = u32::from_le_bytes(le_bytes(&header[0..4]));
        request.set_kind(match kind {
            VIRTIO_BLK_T_IN => "read",
            VIRTIO_BLK_T_OUT => "write",
            VIRTIO_BLK_T_FLUSH => "flush",
            VIRTIO_BLK_T_GET_ID => "get-id",
            VIRTIO_BLK_T_DISCARD => "discard",
            VIRTIO_BLK_T_WRITE_ZEROES => "write-zeroes",
            _ => "unsupported",
        });
        let sector = u64::from_le_bytes(le_bytes(&header[8..16]));
        // Bytes between the header and the status byte, each way.
        let out_data = request.readable_len() - HEADER_LEN;
        let in_data = request.writable_len() - 1;
        match kind {
            VIRTIO_BLK_T_IN => {
                // Data the driver wrote where the device should write is a
                // wrongly-directed buffer.
                if out_data != 0 || in_data % SECTOR_SIZE != 0 {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let offset = self.range(sector, in_data)?;
                Ok(Parsed::Io(Op::Read {
                    offset,
                    len: in_data as usize,
                }))
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only || in_data != 0 || out_data % SECTOR_SIZE != 0 {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let offset = self.range(sector, out_data)?;
                Ok(Parsed::Io(Op::Write {
                    offset,
                    len: out_data as usize,
                }))
            }
            VIRTIO_BLK_T_FLUSH if self.read_only => Ok(Parsed::Done { len: 0 }),
            VIRTIO_BLK_T_FLUSH => Ok(Parsed::Io(Op::Flush)),
            VIRTIO_BLK_T_GET_ID => {
                let n = in_data.min(ID_LEN as u64) as usize;
                request
                    .write_at(0, &self.id[..n])
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                Ok(Parsed::Done { len: n as u64 })
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if self.read_only => {
                Err(VIRTIO_BLK_S_UNSUPP)
            }
            VIRTIO_BLK_T_DISCARD => self.segments(request, true).map(Parsed::Io),
            VIRTIO_BLK_T_WRITE_ZEROES => self.segments(request, false).map(Parsed::Io),
            _ => Err(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// The configuration space (virtio 1.2, 5.2.4), little-endian.
    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8..12) is not offered.
        let seg_max = u32::from(self.queue_size) - 2;
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        // geometry (16..20) is not offered.
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // topology (24..32) and writeback (32) are not offered.
        c[34..36].copy_from_slice(&self.queues.to_le_bytes());
        if !self.read_only {
            c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
            c[44..48].copy_from_slice(&1u32.to_le_bytes());
            c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
            c[56] = 1; // write_zeroes_may_unmap
        }
        c
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        self.pool.lock().closed = true;
        self.pool.ready.notify_all();
        for t in self.threads.drain(..) {
            // A panicking I/O thread already logged; nothing more to do.
            let _ = t.join();
        }
    }
}

/// A byte slice of known length as an array (the callers slice exactly).
fn le_bytes<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// Writes the status byte; returns the used length: `len` data bytes plus
/// the status byte.
fn write_status(request: &mut Request, status_at: u64, status: u8, len: u64) -> u32 {
    if let Err(e) = request.write_at(status_at, &[status]) {
        tracing::warn!(queue = request.queue(), head = request.head(), error = %e, "write the status byte");
    }
    (len + 1).min(u64::from(u32::MAX)) as u32
}

/// A pseudo-random duration below `max` (xorshift on a per-thread state):
/// out-of-order completions for a slowed disk, not randomness anyone
/// relies on.
fn jitter(max: std::time::Duration) -> std::time::Duration {
    thread_local! {
        // Seeded from the thread's stack address: each thread differs.
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            let probe = 0u8;
            0x9E37_79B9_7F4A_7C15 ^ (std::ptr::addr_of!(probe) as u64) | 1
        });
    }
    let x = STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    });
    let nanos = max.as_nanos().max(1) as u64;
    std::time::Duration::from_nanos(x % nanos)
}

/// The test latency of an I/O thread's file operations
/// ([`BlkOptions::latency`], [`BlkOptions::latency_slow_every`]).
#[derive(Clone, Copy)]
struct Latency {
    base: std::time::Duration,
    slow_every: u64,
}

impl Latency {
    /// Waits before the pool's next file operation.
    fn wait(self, pool: &PoolShared) {
        if self.base.is_zero() {
            return;
        }
        let n = pool
            .taken
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if self.slow_every != 0 && n % self.slow_every == 0 {
            thread::sleep(self.base * 10);
        } else {
            thread::sleep(self.base + jitter(self.base));
        }
    }
}

fn io_thread(pool: &PoolShared, file: &File, latency: Latency) {
    let mut buf: Vec<u8> = Vec::new();
    let mut gate: Option<switchboard_runtime::Gate> = None;
    loop {
        let job = {
            let mut q = pool.lock();
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.closed {
                    return;
                }
                q = pool.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        latency.wait(pool);
        // The device's gate, kept for a failure: cloned once per thread,
        // not once per job (a clone per job would bounce its count between
        // this thread and the queue worker).
        if let Some(g) = job.request.gate() {
            if !gate.as_ref().is_some_and(|c| c.same(g)) {
                gate = Some(g.clone());
            }
        }
        // A panic here drops the job's request, whose guard answers it
        // with IOERR, and fails the device; the thread goes on, so jobs
        // admitted before the failure are still answered.
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| run(job, Some(file), &mut buf))) {
            let reason = format!(
                "I/O thread: {}",
                switchboard_runtime::panic_message(p.as_ref())
            );
            match &gate {
                Some(g) => {
                    g.fail(reason);
                }
                None => tracing::error!(%reason, "panic on a replayed request"),
            }
            buf = Vec::new();
        }
        if buf.capacity() > 4 * ZERO_CHUNK {
            buf = Vec::new();
        }
    }
}

/// Does one job's file I/O and answers it.
fn run(job: Job, file: Option<&File>, buf: &mut Vec<u8>) {
    let Job {
        mut request,
        op,
        status_at,
        done,
    } = job;
    let (status, len) = match execute(&op, &mut request, file, buf) {
        Ok(len) => (VIRTIO_BLK_S_OK, len),
        Err(e) => {
            tracing::warn!(queue = request.queue(), head = request.head(), op = ?op, error = %e, "block I/O failed");
            (VIRTIO_BLK_S_IOERR, 0)
        }
    };
    let used = write_status(&mut request, status_at, status, len);
    done.complete(request, used);
}

/// Runs `op`; returns the data bytes written to the guest. File contents
/// reach the request only through [`Request::input`] and changes to the
/// file only through [`Request::effect`], so a recording holds both and a
/// replay (`file` is `None`) needs no image.
fn execute(
    op: &Op,
    request: &mut Request,
    file: Option<&File>,
    buf: &mut Vec<u8>,
) -> io::Result<u64> {
    let file = || file.ok_or_else(|| io::Error::other("no image file (replay)"));
    match *op {
        Op::Read { offset, len } => {
            buf.resize(len, 0);
            request.input_into_guest("file-read", offset, &mut buf[..len], 0, |b| {
                file()?.read_exact_at(b, offset)
            })?;
            Ok(len as u64)
        }
        Op::Write { offset, len } => {
            buf.resize(len, 0);
            request.read_into_effect(
                HEADER_LEN,
                &mut buf[..len],
                "file-write",
                offset,
                |data| file()?.write_all_at(data, offset),
            )?;
            Ok(0)
        }
        Op::Flush => {
            request.effect("flush", 0, 0, None, || file()?.sync_data())?;
            Ok(0)
        }
        Op::Discard(ref ranges) => {
            for &(offset, len) in ranges {
                request.effect("discard", offset, len, None, || {
                    // A discard of nothing is done; fallocate would refuse
                    // a zero length with EINVAL.
                    if len == 0 {
                        return Ok(());
                    }
                    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                    match rustix::fs::fallocate(file()?, flags, offset, len) {
                        // Discard is a hint: a file system that cannot punch
                        // holes keeps the data, which is allowed.
                        Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
                        Err(e) => Err(e.into()),
                    }
                })?;
            }
            Ok(0)
        }
        Op::WriteZeroes(ref ranges) => {
            for &(offset, len, unmap) in ranges {
                let what = if unmap {
                    "write-zeroes-unmap"
                } else {
                    "write-zeroes"
                };
                request.effect(what, offset, len, None, || {
                    zero(file()?, offset, len, unmap, buf)
                })?;
            }
            Ok(0)
        }
    }
}

/// Zeroes `[offset, offset+len)`: a hole if `unmap` and the file system can
/// punch one, else a zeroed range, else written zeroes.
fn zero(file: &File, offset: u64, len: u64, unmap: bool, buf: &mut Vec<u8>) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mut tries = Vec::with_capacity(2);
    if unmap {
        tries.push(FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE);
    }
    tries.push(FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE);
    for flags in tries {
        match rustix::fs::fallocate(file, flags, offset, len) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.clear();
    buf.resize(ZERO_CHUNK, 0);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl VirtioDevice for Blk {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn num_queues(&self) -> usize {
        usize::from(self.queues)
    }

    fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn device_features(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
        if self.queues > 1 {
            f |= VIRTIO_BLK_F_MQ;
        }
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        self.config_space().to_vec()
    }

    fn handle(&self, mut request: Request, done: &Completer) -> Handled {
        if let Some(fault) = &self.test_panic {
            fault.check();
        }
        let writable = request.writable_len();
        if writable == 0 {
            request.set_kind("no-status");
            tracing::warn!(
                queue = request.queue(),
                head = request.head(),
                "virtio-blk request without a writable status byte; answered with nothing"
            );
            return Handled::Done { request, len: 0 };
        }
        let status_at = writable - 1;
        match self.parse(&mut request) {
            Ok(Parsed::Io(op)) => {
                let queue = usize::from(request.queue());
                let job = Job {
                    request,
                    op,
                    status_at,
                    done: done.clone(),
                };
                match self.staged.get(queue) {
                    Some(staged) => {
                        staged.lock().unwrap_or_else(|e| e.into_inner()).push(job);
                        Handled::Pending
                    }
                    None => {
                        // The server only passes queues this device has.
                        tracing::error!(queue, "request on a queue the device does not have");
                        let Job {
                            request, status_at, ..
                        } = job;
                        done_now(request, status_at, VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            Ok(Parsed::Done { len }) => done_now(request, status_at, VIRTIO_BLK_S_OK, len),
            Err(status) => done_now(request, status_at, status, 0),
        }
    }

    fn end_batch(&self, queue: u16) {
        let Some(staged) = self.staged.get(usize::from(queue)) else {
            return;
        };
        let mut staged = staged.lock().unwrap_or_else(|e| e.into_inner());
        if staged.is_empty() {
            return;
        }
        if self.replay {
            let mut buf = self.replay_buf.lock().unwrap_or_else(|e| e.into_inner());
            for job in staged.drain(..) {
                run(job, None, &mut buf);
            }
            return;
        }
        let n = staged.len();
        self.pool.lock().jobs.extend(staged.drain(..));
        if n >= self.io_threads {
            self.pool.ready.notify_all();
        } else {
            for _ in 0..n {
                self.pool.ready.notify_one();
            }
        }
    }

    fn fail_status(&self) -> Option<u8> {
        Some(VIRTIO_BLK_S_IOERR)
    }

    fn rebuild_info(&self) -> Result<serde_json::Value, String> {
        serde_json::to_value(Blk::rebuild_info(self)).map_err(|e| e.to_string())
    }

    fn reject(&self, queue: u16, head: u16, error: &ChainError) {
        tracing::warn!(queue, head, error = %error, "malformed virtio-blk request");
    }
}

/// Answers a request on the queue worker.
fn done_now(mut request: Request, status_at: u64, status: u8, len: u64) -> Handled {
    let len = write_status(&mut request, status_at, status, len);
    Handled::Done { request, len }
}

#[cfg(test)]
mod tests;
