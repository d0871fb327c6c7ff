// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `blk_bench`: a host-side benchmark driver for any vhost-user-blk backend.
//!
//! It plays the VMM and the guest's virtio-blk driver at once, with no guest:
//! the `vhost` crate's frontend on the backend's socket, guest memory in a
//! memfd shared through SET_MEM_TABLE, and one split virtqueue filled by
//! hand. It keeps `--iodepth` 4 KiB random reads or writes in flight over the
//! whole image for a fixed time and reports IOPS and, given the backend's
//! PID, the backend's CPU time per I/O. With no guest kernel in the way the
//! figures are bound by the backend, so two backends can be compared on the
//! same machine (`integration/qemu/bench-backend.sh` does that).
//!
//! Only `VIRTIO_F_VERSION_1` is negotiated among the virtio features (no
//! `EVENT_IDX`, no indirect descriptors), so every backend gets the same
//! driver: a kick unless the device set `VRING_USED_F_NO_NOTIFY`, and an
//! interrupt (call eventfd) for every batch of completions.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clap::{Parser, ValueEnum};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Device feature bit: a virtio 1.x device (virtio 1.2, 6).
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Descriptor flag: the chain continues in `next` (virtio 1.2, 2.7.5).
const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable (virtio 1.2, 2.7.5).
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Used-ring flag: the device does not need kicks for now (virtio 1.2, 2.7.10).
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
/// Largest split virtqueue (virtio 1.2, 2.7).
const MAX_QUEUE_SIZE: u16 = 32768;
/// virtio-blk request types (virtio 1.2, 5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
/// virtio-blk status values (virtio 1.2, 5.2.6).
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// virtio-blk sectors are always 512 bytes (virtio 1.2, 5.2.6).
const SECTOR_SIZE: u64 = 512;
/// Size of every request's data buffer.
const BLOCK_SIZE: u64 = 4096;
/// Descriptors per request: header, data, status.
const DESCS_PER_REQUEST: u16 = 3;
/// Written into a status byte before submission, so a request the backend
/// completes without writing its status is caught.
const STATUS_PENDING: u8 = 0xff;
/// Start of every block written in `randwrite`, followed by the sector.
const WRITE_MAGIC: u64 = u64::from_le_bytes(*b"BLKBENCH");

/// The two workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
    /// 4 KiB reads at random 4 KiB-aligned offsets.
    Randread,
    /// 4 KiB writes at random 4 KiB-aligned offsets; each block written starts
    /// with a tag (magic and sector number) so `--verify` can check it.
    Randwrite,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
        }
    }
}

/// Drives a vhost-user-blk backend with random 4 KiB I/O at a fixed queue
/// depth on one virtqueue, without a guest, and prints one result line:
///
/// blk_bench: backend=NAME rw=RW bs=4096 qd=N seconds=S ios=N iops=N
/// [backend_cpu_us_per_io=X] driver_cpu_us_per_io=X sampled=N verified=N
///
/// seconds is the measured window as it really elapsed; the CPU figures are
/// user+system time (all threads) over that window divided by its I/Os.
#[derive(Debug, Parser)]
#[command(name = "blk_bench", version, verbatim_doc_comment)]
struct Args {
    /// The backend's vhost-user socket (waited for up to --connect-timeout).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Workload: random 4 KiB reads or random 4 KiB writes.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,
    /// Requests kept in flight; each takes 3 descriptors, so at most
    /// --queue-size / 3.
    #[arg(long, default_value_t = 32, value_name = "N")]
    iodepth: u16,
    /// Virtqueue size: a power of two up to 32768.
    #[arg(long, default_value_t = 256, value_name = "N")]
    queue_size: u16,
    /// Length of the measured window, in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    seconds: f64,
    /// Time spent running the workload before the measured window starts,
    /// in seconds (not counted).
    #[arg(long, default_value_t = 1.0, value_name = "SECS")]
    warmup: f64,
    /// Image size to use when the backend does not report its capacity
    /// through GET_CONFIG (bytes, or with a K, M, G or T suffix: powers of 1024).
    #[arg(long, value_name = "BYTES")]
    size: Option<String>,
    /// The backend's process ID: report its CPU time per I/O, read from
    /// /proc/PID/stat before and after the measured window.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// Name of the backend, copied into the result line.
    #[arg(long, default_value = "unknown", value_name = "NAME")]
    backend: String,
    /// After the run, read back N blocks through the backend and check them:
    /// in randwrite the blocks written last must hold the tag and pattern
    /// written; in both modes, with --image, each block must equal the image
    /// file's bytes. 0 checks nothing beyond the status bytes.
    #[arg(long, default_value_t = 0, value_name = "N")]
    verify: usize,
    /// The image file the backend serves, for --verify and --sample to
    /// compare against.
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// With --image, also check every Nth completed request during the run
    /// itself: a read's data must equal the image's block, and after a write
    /// the image must hold the block written. 0 samples nothing.
    #[arg(long, default_value_t = 0, value_name = "N")]
    sample: u64,
    /// Seed of the offset generator (the same seed gives the same offsets).
    #[arg(long, default_value_t = 1, value_name = "N")]
    seed: u64,
    /// How long to keep retrying to connect while the backend starts, in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    connect_timeout: f64,
    /// A hard error if no request completes for this long, in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    io_timeout: f64,
    /// Print what was negotiated (features, protocol features, capacity) to
    /// standard error.
    #[arg(short, long)]
    verbose: bool,
    /// Negotiate in-flight tracking (INFLIGHT_SHMFD) as QEMU's vhost-user-blk
    /// does: GET_INFLIGHT_FD, then SET_INFLIGHT_FD with the file returned,
    /// so the backend's in-flight bookkeeping runs on every request. An
    /// error if the backend does not offer it.
    #[arg(long)]
    inflight: bool,
}

/// The validated run.
#[derive(Debug)]
struct Config {
    socket: PathBuf,
    rw: Rw,
    iodepth: u16,
    queue_size: u16,
    seconds: Duration,
    warmup: Duration,
    size: Option<u64>,
    pid: Option<u32>,
    backend: String,
    verify: usize,
    image: Option<PathBuf>,
    sample: u64,
    seed: u64,
    connect_timeout: Duration,
    io_timeout: Duration,
    verbose: bool,
    inflight: bool,
}

fn duration(what: &str, secs: f64, allow_zero: bool) -> anyhow::Result<Duration> {
    ensure!(
        secs.is_finite() && (secs > 0.0 || (allow_zero && secs == 0.0)),
        "{what} must be a {} number of seconds, not {secs}",
        if allow_zero {
            "non-negative"
        } else {
            "positive"
        }
    );
    Duration::try_from_secs_f64(secs).with_context(|| format!("{what} {secs} is out of range"))
}

/// Parses `4096`, `256M`, `1G`, ... (powers of 1024).
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => bail!("--size {s}: unknown suffix '{c}' (want K, M, G or T)"),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("--size {s}: not a number of bytes"))?;
    n.checked_mul(1 << shift)
        .with_context(|| format!("--size {s} is too large"))
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Self> {
        ensure!(
            a.queue_size.is_power_of_two() && a.queue_size <= MAX_QUEUE_SIZE,
            "--queue-size must be a power of two up to {MAX_QUEUE_SIZE}, not {}",
            a.queue_size
        );
        ensure!(a.iodepth >= 1, "--iodepth must be at least 1");
        ensure!(
            u32::from(a.iodepth) * u32::from(DESCS_PER_REQUEST) <= u32::from(a.queue_size),
            "--iodepth {} needs {} descriptors ({DESCS_PER_REQUEST} per request) but --queue-size is {}: \
             raise --queue-size or lower --iodepth",
            a.iodepth,
            u32::from(a.iodepth) * u32::from(DESCS_PER_REQUEST),
            a.queue_size
        );
        let size = a.size.as_deref().map(parse_size).transpose()?;
        if let Some(size) = size {
            ensure!(
                size >= BLOCK_SIZE && size % BLOCK_SIZE == 0,
                "--size {size} must be a non-zero multiple of {BLOCK_SIZE} bytes"
            );
        }
        if let Some(pid) = a.pid {
            let stat = format!("/proc/{pid}/stat");
            ensure!(
                Path::new(&stat).exists(),
                "--pid {pid}: no such process ({stat} does not exist)"
            );
        }
        ensure!(
            a.sample == 0 || a.image.is_some(),
            "--sample needs --image (the image file to compare with)"
        );
        if let Some(image) = &a.image {
            ensure!(
                image.is_file(),
                "--image {}: not a regular file",
                image.display()
            );
        }
        ensure!(
            !a.backend.is_empty() && !a.backend.contains(char::is_whitespace),
            "--backend must be a non-empty name without spaces, not {:?}",
            a.backend
        );
        Ok(Config {
            socket: a.socket,
            rw: a.rw,
            iodepth: a.iodepth,
            queue_size: a.queue_size,
            seconds: duration("--seconds", a.seconds, false)?,
            warmup: duration("--warmup", a.warmup, true)?,
            size,
            pid: a.pid,
            backend: a.backend,
            verify: a.verify,
            image: a.image,
            sample: a.sample,
            seed: a.seed,
            connect_timeout: duration("--connect-timeout", a.connect_timeout, true)?,
            io_timeout: duration("--io-timeout", a.io_timeout, false)?,
            verbose: a.verbose,
            inflight: a.inflight,
        })
    }
}

/// Where everything lives in guest memory (guest-physical addresses).
#[derive(Clone, Copy, Debug)]
struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
    /// One 16-byte request header per slot.
    headers: u64,
    /// One status byte per slot.
    status: u64,
    /// One 4 KiB data buffer per slot, 4 KiB-aligned.
    data: u64,
    /// Bytes of guest memory.
    size: u64,
}

const fn align_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl Layout {
    fn new(queue_size: u16, depth: u16) -> Self {
        let (q, d) = (u64::from(queue_size), u64::from(depth));
        let desc = 0;
        let avail = desc + 16 * q;
        // flags, idx, ring[q], used_event
        let used = align_up(avail + 6 + 2 * q, 4096);
        let headers = align_up(used + 6 + 8 * q, 4096);
        let status = headers + 16 * d;
        let data = align_up(status + d, 4096);
        let size = align_up(data + BLOCK_SIZE * d, 2 << 20);
        Layout {
            desc,
            avail,
            used,
            headers,
            status,
            data,
            size,
        }
    }

    fn header(&self, slot: u16) -> u64 {
        self.headers + 16 * u64::from(slot)
    }

    fn status(&self, slot: u16) -> u64 {
        self.status + u64::from(slot)
    }

    fn data(&self, slot: u16) -> u64 {
        self.data + BLOCK_SIZE * u64::from(slot)
    }
}

/// One request in flight.
#[derive(Clone, Copy, Debug)]
struct Request {
    write: bool,
    sector: u64,
}

/// The byte at `offset` (16 or more) of every block written: a fixed
/// pattern after the 16-byte tag.
fn pattern_byte(offset: usize) -> u8 {
    (offset as u8) ^ 0x5a
}

/// xorshift64*: fast, and good enough to scatter offsets.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // Zero is the generator's fixed point; splitmix the seed instead.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (multiply-shift, no division).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// The frontend, guest memory and the one queue.
struct Driver {
    /// Keeps the vhost-user session open; dropping it closes the socket,
    /// which makes the backend stop the queue and forget the memory table.
    _frontend: Frontend,
    mem: GuestMemoryMmap,
    lay: Layout,
    queue_size: u16,
    depth: u16,
    /// Driver's next free avail-ring index (published on `publish`).
    avail_idx: u16,
    /// Next used-ring index to read.
    last_used: u16,
    /// The backend reads this one (SET_VRING_KICK).
    kick: EventFd,
    /// The backend writes this one (SET_VRING_CALL); non-blocking, waited
    /// on through `epoll`.
    call: EventFd,
    epoll: Epoll,
    io_timeout: Duration,
    /// The request each slot carries, if it is in flight.
    inflight: Vec<Option<Request>>,
    in_flight: u16,
    /// Completions taken by the last `reap`, checked and not yet resubmitted.
    done: Vec<(u16, Request)>,
    /// Image size in 4 KiB blocks.
    blocks: u64,
    /// Used entries whose length differed from the bytes the device wrote.
    len_mismatches: u64,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("lay", &self.lay)
            .field("queue_size", &self.queue_size)
            .field("depth", &self.depth)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Frontend> {
    let start = Instant::now();
    loop {
        match Frontend::connect(path, 1) {
            Ok(f) => return Ok(f),
            // The backend may still be starting: its socket may not exist yet.
            Err(_) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("connect to {} (waited {timeout:?})", path.display()))
            }
        }
    }
}

fn memfd_memory(size: u64) -> anyhow::Result<GuestMemoryMmap> {
    let fd = rustix::fs::memfd_create("blk_bench-guest", rustix::fs::MemfdFlags::CLOEXEC)
        .context("create the guest memory memfd")?;
    let file = File::from(fd);
    file.set_len(size)
        .with_context(|| format!("size the guest memory memfd to {size} bytes"))?;
    let len = usize::try_from(size).context("guest memory size")?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        len,
        Some(FileOffset::new(file, 0)),
    )])
    .context("map guest memory")
}

impl Driver {
    /// Connects, negotiates, shares guest memory, reads the capacity and
    /// sets up queue 0.
    fn connect(cfg: &Config) -> anyhow::Result<Self> {
        let mut fe = connect(&cfg.socket, cfg.connect_timeout)?;
        fe.set_owner().context("SET_OWNER")?;
        let offered = fe.get_features().context("GET_FEATURES")?;
        ensure!(
            offered & VIRTIO_F_VERSION_1 != 0,
            "the backend does not offer VIRTIO_F_VERSION_1 (features {offered:#x})"
        );
        let pf_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        fe.set_features(VIRTIO_F_VERSION_1 | (offered & pf_bit))
            .context("SET_FEATURES")?;
        let mut proto = VhostUserProtocolFeatures::empty();
        if cfg.verbose {
            eprintln!("blk_bench: features offered {offered:#x}");
        }
        if offered & pf_bit != 0 {
            let pf = fe
                .get_protocol_features()
                .context("GET_PROTOCOL_FEATURES")?;
            let mut want = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG;
            if cfg.inflight {
                ensure!(
                    pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
                    "--inflight: the backend does not offer INFLIGHT_SHMFD"
                );
                want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
            }
            proto = pf & want;
            if cfg.verbose {
                eprintln!("blk_bench: protocol features offered {pf:?}, acked {proto:?}");
            }
            fe.set_protocol_features(proto)
                .context("SET_PROTOCOL_FEATURES")?;
            if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // As QEMU does: each request waits for the backend's answer.
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }

        if cfg.inflight {
            let ask = VhostUserInflight {
                num_queues: 1,
                queue_size: cfg.queue_size,
                ..VhostUserInflight::default()
            };
            let (got, file) = fe.get_inflight_fd(&ask).context("GET_INFLIGHT_FD")?;
            ensure!(
                got.mmap_size > 0,
                "GET_INFLIGHT_FD: the backend gave no file"
            );
            fe.set_inflight_fd(&got, file.as_raw_fd())
                .context("SET_INFLIGHT_FD")?;
        }
        let lay = Layout::new(cfg.queue_size, cfg.iodepth);
        let mem = memfd_memory(lay.size)?;
        let regions = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).context("memory region info"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        fe.set_mem_table(&regions).context("SET_MEM_TABLE")?;

        let capacity = if proto.contains(VhostUserProtocolFeatures::CONFIG) {
            // virtio-blk config offset 0: capacity in 512-byte sectors.
            let (_, buf) = fe
                .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])
                .context("GET_CONFIG (capacity)")?;
            let sectors = u64::from_le_bytes(
                buf.get(..8)
                    .and_then(|b| b.try_into().ok())
                    .context("GET_CONFIG returned fewer than 8 bytes")?,
            );
            Some(sectors.checked_mul(SECTOR_SIZE).with_context(|| {
                format!("the backend reports an impossible capacity of {sectors} sectors")
            })?)
        } else {
            None
        };
        let bytes = match (capacity, cfg.size) {
            (Some(c), _) => c,
            (None, Some(s)) => s,
            (None, None) => bail!(
                "the backend does not offer the CONFIG protocol feature, so its capacity is unknown: give --size"
            ),
        };
        let blocks = bytes / BLOCK_SIZE;
        if cfg.verbose {
            eprintln!(
                "blk_bench: capacity {bytes} bytes ({}), {blocks} blocks of {BLOCK_SIZE}",
                if capacity.is_some() {
                    "GET_CONFIG"
                } else {
                    "--size"
                }
            );
        }
        ensure!(
            blocks >= 1,
            "the image holds {bytes} bytes, less than one {BLOCK_SIZE}-byte block"
        );

        let host = |gpa: u64| -> anyhow::Result<u64> {
            let p = mem
                .get_host_address(GuestAddress(gpa))
                .with_context(|| format!("ring address {gpa:#x} outside guest memory"))?;
            Ok(p as u64)
        };
        let vring = VringConfigData {
            queue_max_size: cfg.queue_size,
            queue_size: cfg.queue_size,
            flags: 0,
            desc_table_addr: host(lay.desc)?,
            used_ring_addr: host(lay.used)?,
            avail_ring_addr: host(lay.avail)?,
            log_addr: None,
        };
        let kick = EventFd::new(0).context("create the kick eventfd")?;
        let call = EventFd::new(EFD_NONBLOCK).context("create the call eventfd")?;
        let epoll = Epoll::new().context("create an epoll instance")?;
        epoll
            .ctl(
                ControlOperation::Add,
                call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .context("watch the call eventfd")?;
        fe.set_vring_num(0, cfg.queue_size)
            .context("SET_VRING_NUM")?;
        fe.set_vring_addr(0, &vring).context("SET_VRING_ADDR")?;
        fe.set_vring_base(0, 0).context("SET_VRING_BASE")?;
        fe.set_vring_call(0, &call).context("SET_VRING_CALL")?;
        fe.set_vring_kick(0, &kick).context("SET_VRING_KICK")?;
        if offered & pf_bit != 0 {
            // With VHOST_USER_F_PROTOCOL_FEATURES rings start disabled.
            fe.set_vring_enable(0, true).context("SET_VRING_ENABLE")?;
        }

        Ok(Driver {
            _frontend: fe,
            mem,
            lay,
            queue_size: cfg.queue_size,
            depth: cfg.iodepth,
            avail_idx: 0,
            last_used: 0,
            kick,
            call,
            epoll,
            io_timeout: cfg.io_timeout,
            inflight: vec![None; usize::from(cfg.iodepth)],
            in_flight: 0,
            done: Vec::with_capacity(usize::from(cfg.iodepth)),
            blocks,
            len_mismatches: 0,
        })
    }

    /// Fills every slot's data buffer with the write pattern (the tag is
    /// written per request).
    fn fill_pattern(&self) -> anyhow::Result<()> {
        let block: Vec<u8> = (0..BLOCK_SIZE as usize).map(pattern_byte).collect();
        for slot in 0..self.depth {
            self.mem
                .write_slice(&block, GuestAddress(self.lay.data(slot)))
                .context("fill the write buffers")?;
        }
        Ok(())
    }

    /// Writes `slot`'s request and puts its chain on the avail ring, not
    /// yet published.
    fn submit(&mut self, slot: u16, req: Request) -> anyhow::Result<()> {
        let lay = self.lay;
        let mut hdr = [0u8; 16];
        let ty = if req.write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        hdr[..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..].copy_from_slice(&req.sector.to_le_bytes());
        self.mem
            .write_slice(&hdr, GuestAddress(lay.header(slot)))
            .context("write a request header")?;
        if req.write {
            let mut tag = [0u8; 16];
            tag[..8].copy_from_slice(&WRITE_MAGIC.to_le_bytes());
            tag[8..].copy_from_slice(&req.sector.to_le_bytes());
            self.mem
                .write_slice(&tag, GuestAddress(lay.data(slot)))
                .context("write a block's tag")?;
        }
        self.mem
            .write_obj(STATUS_PENDING, GuestAddress(lay.status(slot)))
            .context("reset a status byte")?;

        let head = slot * DESCS_PER_REQUEST;
        let data_flags = if req.write {
            VIRTQ_DESC_F_NEXT
        } else {
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE
        };
        let chain = [
            (lay.header(slot), 16u32, VIRTQ_DESC_F_NEXT, head + 1),
            (lay.data(slot), BLOCK_SIZE as u32, data_flags, head + 2),
            (lay.status(slot), 1, VIRTQ_DESC_F_WRITE, 0),
        ];
        let mut descs = [0u8; 16 * DESCS_PER_REQUEST as usize];
        for (d, (addr, len, flags, next)) in descs.chunks_exact_mut(16).zip(chain) {
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
        }
        self.mem
            .write_slice(&descs, GuestAddress(lay.desc + 16 * u64::from(head)))
            .context("write descriptors")?;
        let entry = lay.avail + 4 + 2 * u64::from(self.avail_idx % self.queue_size);
        self.mem
            .write_obj(head, GuestAddress(entry))
            .context("write an avail-ring entry")?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        if let Some(s) = self.inflight.get_mut(usize::from(slot)) {
            *s = Some(req);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Publishes the avail index and kicks unless the device asked not to.
    fn publish(&mut self) -> anyhow::Result<()> {
        self.mem
            .store(
                self.avail_idx,
                GuestAddress(self.lay.avail + 2),
                Ordering::Release,
            )
            .context("publish the avail index")?;
        // The index store must be visible before the flag is read, or a
        // device going idle between the two would miss the new requests.
        fence(Ordering::SeqCst);
        let flags: u16 = self
            .mem
            .load(GuestAddress(self.lay.used), Ordering::Acquire)
            .context("read the used-ring flags")?;
        if flags & VIRTQ_USED_F_NO_NOTIFY == 0 {
            self.kick.write(1).context("kick the queue")?;
        }
        Ok(())
    }

    /// Waits for at least one completion, checks every completed request
    /// and moves it into `done`.
    fn reap(&mut self) -> anyhow::Result<()> {
        let timeout_ms = i32::try_from(self.io_timeout.as_millis()).unwrap_or(i32::MAX);
        let mut events = [EpollEvent::default()];
        loop {
            let used_idx: u16 = self
                .mem
                .load(GuestAddress(self.lay.used + 2), Ordering::Acquire)
                .context("read the used index")?;
            let new = used_idx.wrapping_sub(self.last_used);
            if new > 0 {
                ensure!(
                    new <= self.in_flight,
                    "the backend moved the used index by {new} with {} requests in flight",
                    self.in_flight
                );
                for _ in 0..new {
                    self.take_used()?;
                }
                return Ok(());
            }
            let n = loop {
                match self.epoll.wait(timeout_ms, &mut events) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r.context("wait for the call eventfd")?,
                }
            };
            ensure!(
                n > 0,
                "no request completed within {:?} ({} in flight)",
                self.io_timeout,
                self.in_flight
            );
            match self.call.read() {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("read the call eventfd"),
            }
        }
    }

    fn take_used(&mut self) -> anyhow::Result<()> {
        let elem = self.lay.used + 4 + 8 * u64::from(self.last_used % self.queue_size);
        self.last_used = self.last_used.wrapping_add(1);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(elem))
            .context("read a used entry")?;
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(elem + 4))
            .context("read a used entry")?;
        let slot = u16::try_from(id / u32::from(DESCS_PER_REQUEST))
            .ok()
            .filter(|_| id % u32::from(DESCS_PER_REQUEST) == 0);
        let req = slot
            .and_then(|s| self.inflight.get_mut(usize::from(s)))
            .and_then(Option::take);
        let (Some(slot), Some(req)) = (slot, req) else {
            bail!("the backend returned descriptor {id}, which is not the head of a request in flight");
        };
        self.in_flight -= 1;
        let status: u8 = self
            .mem
            .read_obj(GuestAddress(self.lay.status(slot)))
            .context("read a status byte")?;
        if status != VIRTIO_BLK_S_OK {
            let what = match status {
                VIRTIO_BLK_S_IOERR => "IOERR",
                VIRTIO_BLK_S_UNSUPP => "UNSUPP",
                STATUS_PENDING => "never written",
                _ => "invalid",
            };
            bail!(
                "{} of sector {} (byte offset {}) failed: status {status} ({what})",
                if req.write { "write" } else { "read" },
                req.sector,
                req.sector * SECTOR_SIZE
            );
        }
        let written = if req.write { 1 } else { BLOCK_SIZE as u32 + 1 };
        if len != written {
            self.len_mismatches += 1;
        }
        self.done.push((slot, req));
        Ok(())
    }

    fn random_request(&self, rng: &mut Rng, write: bool) -> Request {
        Request {
            write,
            sector: rng.below(self.blocks) * (BLOCK_SIZE / SECTOR_SIZE),
        }
    }

    /// Waits until nothing is in flight, keeping completed writes' sectors
    /// in `recent`.
    fn drain(&mut self, recent: &mut Recent) -> anyhow::Result<()> {
        while self.in_flight > 0 {
            self.reap()?;
            for (_, req) in self.done.drain(..) {
                recent.note(req);
            }
        }
        Ok(())
    }
}

/// The sectors of the last writes completed, for `--verify`.
#[derive(Debug)]
struct Recent {
    cap: usize,
    sectors: VecDeque<u64>,
}

impl Recent {
    fn note(&mut self, req: Request) {
        if req.write && self.cap > 0 {
            if self.sectors.len() == self.cap {
                self.sectors.pop_front();
            }
            self.sectors.push_back(req.sector);
        }
    }
}

/// utime + stime of a process, in clock ticks (proc(5): fields 14 and 15).
fn cpu_ticks(stat_path: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(stat_path).with_context(|| format!("read {stat_path}"))?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')', after which field 3 comes.
    let rest = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .with_context(|| format!("{stat_path}: no ')' after the command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("{stat_path}: fewer than {n} fields"))?
            .parse()
            .with_context(|| format!("{stat_path}: field {n} is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// CPU-time snapshots of the backend (if known) and of this driver.
#[derive(Clone, Copy, Debug)]
struct Snapshot {
    at: Instant,
    ios: u64,
    backend: Option<u64>,
    driver: u64,
}

fn snapshot(cfg: &Config, ios: u64) -> anyhow::Result<Snapshot> {
    let backend = cfg
        .pid
        .map(|pid| cpu_ticks(&format!("/proc/{pid}/stat")))
        .transpose()
        .context("backend CPU time (has the backend exited?)")?;
    Ok(Snapshot {
        at: Instant::now(),
        ios,
        backend,
        driver: cpu_ticks("/proc/self/stat").context("the driver's own CPU time")?,
    })
}

/// What the run measured.
#[derive(Debug)]
struct Report {
    elapsed: Duration,
    ios: u64,
    backend_ticks: Option<u64>,
    driver_ticks: u64,
    sampled: u64,
    verified: usize,
    len_mismatches: u64,
}

/// Compares blocks with what they must hold: the tag and pattern of a block
/// this driver wrote, and the image file's bytes.
#[derive(Debug)]
struct Checker {
    image: Option<File>,
    got: Vec<u8>,
    want: Vec<u8>,
}

impl Checker {
    fn new(image: Option<&Path>) -> anyhow::Result<Self> {
        Ok(Checker {
            image: image
                .map(|p| File::open(p).with_context(|| format!("open the image {}", p.display())))
                .transpose()?,
            got: vec![0; BLOCK_SIZE as usize],
            want: vec![0; BLOCK_SIZE as usize],
        })
    }

    /// Fills `want` with the block this driver writes at `sector`.
    fn expect_written(&mut self, sector: u64) {
        self.want[..8].copy_from_slice(&WRITE_MAGIC.to_le_bytes());
        self.want[8..16].copy_from_slice(&sector.to_le_bytes());
        for (i, b) in self.want.iter_mut().enumerate().skip(16) {
            *b = pattern_byte(i);
        }
    }

    /// Reads the image's block at `sector` into `buf`.
    fn image_block(image: &File, sector: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        let offset = sector * SECTOR_SIZE;
        image.read_exact_at(buf, offset).with_context(|| {
            format!("read {BLOCK_SIZE} bytes of the image at byte offset {offset}")
        })
    }

    /// Checks the data a completed read of `sector` left in `slot`'s
    /// buffer: against the write pattern if `tagged`, and against the image.
    fn check_read(
        &mut self,
        d: &Driver,
        slot: u16,
        sector: u64,
        tagged: bool,
    ) -> anyhow::Result<()> {
        let offset = sector * SECTOR_SIZE;
        d.mem
            .read_slice(&mut self.got, GuestAddress(d.lay.data(slot)))
            .context("read back a data buffer")?;
        if tagged {
            self.expect_written(sector);
            if let Some(i) = first_difference(&self.got, &self.want) {
                bail!(
                    "the block written at sector {sector} (byte offset {offset}) \
                     reads back wrong from byte {i} on"
                );
            }
        }
        if let Some(image) = &self.image {
            Self::image_block(image, sector, &mut self.want)?;
            if let Some(i) = first_difference(&self.got, &self.want) {
                bail!(
                    "the backend's block at sector {sector} (byte offset {offset}) \
                     differs from the image file from byte {i} on"
                );
            }
        }
        Ok(())
    }

    /// Checks that the image holds the block just written at `sector`.
    fn check_written(&mut self, sector: u64) -> anyhow::Result<()> {
        let Some(image) = &self.image else {
            return Ok(());
        };
        Self::image_block(image, sector, &mut self.got)?;
        self.expect_written(sector);
        if let Some(i) = first_difference(&self.got, &self.want) {
            bail!(
                "the image file's block at sector {sector} (byte offset {}) differs from \
                 what the completed write carried, from byte {i} on",
                sector * SECTOR_SIZE
            );
        }
        Ok(())
    }
}

fn run(cfg: &Config) -> anyhow::Result<Report> {
    let mut d = Driver::connect(cfg)?;
    let mut checker = Checker::new(cfg.image.as_deref())?;
    let write = cfg.rw == Rw::Randwrite;
    if write {
        d.fill_pattern()?;
    }
    let mut rng = Rng::new(cfg.seed);
    let mut recent = Recent {
        cap: cfg.verify,
        sectors: VecDeque::with_capacity(cfg.verify),
    };
    for slot in 0..d.depth {
        let req = d.random_request(&mut rng, write);
        d.submit(slot, req)?;
    }
    d.publish()?;

    let mut ios = 0u64;
    let mut sampled = 0u64;
    let warm_end = Instant::now() + cfg.warmup;
    let mut start: Option<Snapshot> = None;
    let end = loop {
        d.reap()?;
        let mut done = std::mem::take(&mut d.done);
        for (slot, req) in done.drain(..) {
            ios += 1;
            if cfg.sample > 0 && ios % cfg.sample == 0 {
                if req.write {
                    checker.check_written(req.sector)
                } else {
                    checker.check_read(&d, slot, req.sector, false)
                }
                .with_context(|| format!("sample check of request {ios}"))?;
                sampled += 1;
            }
            recent.note(req);
            let next = d.random_request(&mut rng, write);
            d.submit(slot, next)?;
        }
        d.done = done;
        d.publish()?;
        let now = Instant::now();
        match start {
            None if now >= warm_end => start = Some(snapshot(cfg, ios)?),
            Some(s) if now.duration_since(s.at) >= cfg.seconds => break snapshot(cfg, ios)?,
            _ => {}
        }
    };
    let start = start.context("the measured window never started")?;
    d.drain(&mut recent)?;
    let verified = verify(cfg, &mut d, &mut rng, &recent, &mut checker).context("verify")?;
    Ok(Report {
        elapsed: end.at.duration_since(start.at),
        ios: end.ios - start.ios,
        backend_ticks: end
            .backend
            .zip(start.backend)
            .map(|(e, s)| e.saturating_sub(s)),
        driver_ticks: end.driver.saturating_sub(start.driver),
        sampled,
        verified,
        len_mismatches: d.len_mismatches,
    })
}

/// Reads blocks back through the backend and checks them; returns how many.
fn verify(
    cfg: &Config,
    d: &mut Driver,
    rng: &mut Rng,
    recent: &Recent,
    checker: &mut Checker,
) -> anyhow::Result<usize> {
    let written = cfg.rw == Rw::Randwrite;
    let sectors: Vec<u64> = if written {
        recent.sectors.iter().copied().collect()
    } else {
        (0..cfg.verify)
            .map(|_| d.random_request(rng, false).sector)
            .collect()
    };
    let mut scratch = Recent {
        cap: 0,
        sectors: VecDeque::new(),
    };
    for chunk in sectors.chunks(usize::from(d.depth)) {
        for (slot, &sector) in (0..d.depth).zip(chunk) {
            d.submit(
                slot,
                Request {
                    write: false,
                    sector,
                },
            )?;
        }
        d.publish()?;
        d.drain(&mut scratch)?;
        for (slot, &sector) in (0..d.depth).zip(chunk) {
            checker.check_read(d, slot, sector, written)?;
        }
    }
    Ok(sectors.len())
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn per_io_us(ticks: u64, hz: u64, ios: u64) -> f64 {
    if ios == 0 || hz == 0 {
        return f64::NAN;
    }
    ticks as f64 / hz as f64 * 1e6 / ios as f64
}

fn main() -> ExitCode {
    let result = Config::try_from(Args::parse()).and_then(|cfg| {
        let r = run(&cfg)?;
        let hz = rustix::param::clock_ticks_per_second();
        let secs = r.elapsed.as_secs_f64();
        let iops = if secs > 0.0 {
            r.ios as f64 / secs
        } else {
            0.0
        };
        let backend_cpu = r
            .backend_ticks
            .map(|t| format!(" backend_cpu_us_per_io={:.1}", per_io_us(t, hz, r.ios)))
            .unwrap_or_default();
        println!(
            "blk_bench: backend={} rw={} bs={BLOCK_SIZE} qd={} seconds={secs:.1} ios={} iops={iops:.0}{backend_cpu} \
             driver_cpu_us_per_io={:.1} sampled={} verified={}",
            cfg.backend,
            cfg.rw.name(),
            cfg.iodepth,
            r.ios,
            per_io_us(r.driver_ticks, hz, r.ios),
            r.sampled,
            r.verified,
        );
        if r.len_mismatches > 0 {
            eprintln!(
                "blk_bench: note: {} used entries gave a length other than the bytes written \
                 (4097 for a read, 1 for a write)",
                r.len_mismatches
            );
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blk_bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_size_suffixes() {
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("1G").ok(), Some(1 << 30));
        assert_eq!(parse_size("256m").ok(), Some(256 << 20));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn test_layout_does_not_overlap() {
        let l = Layout::new(256, 85);
        assert!(l.avail >= l.desc + 16 * 256);
        assert!(l.used >= l.avail + 6 + 2 * 256 && l.used % 4096 == 0);
        assert!(l.headers >= l.used + 6 + 8 * 256);
        assert!(l.status >= l.header(85));
        assert!(l.data >= l.status(85) && l.data % 4096 == 0);
        assert!(l.size >= l.data(85));
    }

    #[test]
    fn test_rng_below_stays_in_range() {
        let mut rng = Rng::new(0);
        assert!((0..10_000).all(|_| rng.below(7) < 7));
    }

    #[test]
    fn test_cpu_ticks_reads_own_stat() {
        assert!(cpu_ticks("/proc/self/stat").is_ok());
    }
}
