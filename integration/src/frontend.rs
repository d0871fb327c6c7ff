// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A test driver playing the VMM and the guest driver against a vhost-user
//! backend: the `vhost` crate's real frontend on the socket, guest memory in
//! a shared file, and split virtqueues laid out and filled by hand.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

/// Descriptor flag: the chain continues (virtio 1.2, 2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// One split virtqueue in test guest memory.
#[derive(Debug)]
pub struct TestQueue {
    /// Queue size.
    pub size: u16,
    /// Descriptor table (guest address).
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

/// A frontend with its guest memory and queues.
pub struct TestFrontend {
    /// The vhost crate's frontend.
    pub frontend: Frontend,
    /// Guest memory (shared with the backend).
    pub mem: GuestMemoryMmap,
    /// The queues.
    pub queues: Vec<TestQueue>,
    /// The backing file of guest memory.
    pub file: File,
}

impl std::fmt::Debug for TestFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestFrontend")
            .field("queues", &self.queues)
            .finish()
    }
}

/// Bytes of guest memory in the first region; rings live in its first MiB.
pub const MEM_SIZE: u64 = 16 << 20;

/// Connects to `path` (retrying while the backend starts), negotiates
/// features, sends the memory table and sets up `queues` queues of `size`.
/// Guest memory is a temporary file of [`MEM_SIZE`] bytes.
pub fn connect(path: &Path, queues: usize, size: u16) -> anyhow::Result<TestFrontend> {
    let file = tempfile::tempfile().context("guest memory file")?;
    file.set_len(MEM_SIZE).context("size guest memory")?;
    connect_with(path, queues, size, file)
}

/// A memfd of `len` bytes, not sealed (so it can be shrunk), as QEMU's
/// `memory-backend-memfd` makes with `seal=off`.
pub fn memfd(len: u64) -> anyhow::Result<File> {
    let fd = rustix::fs::memfd_create("switchboard-test-guest", rustix::fs::MemfdFlags::CLOEXEC)
        .context("memfd_create")?;
    let file = File::from(fd);
    file.set_len(len).context("size the memfd")?;
    Ok(file)
}

/// A memory-table entry as a frontend could send it, whatever it says:
/// `size` bytes at guest address `gpa`, at `user_addr` in the frontend's
/// address space, mapped from `file` at `offset`.
pub fn raw_region(
    gpa: u64,
    size: u64,
    user_addr: u64,
    offset: u64,
    file: &File,
) -> VhostUserMemoryRegionInfo {
    use std::os::fd::AsRawFd;
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: user_addr,
        mmap_offset: offset,
        mmap_handle: file.as_raw_fd(),
    }
}

/// Connects to `path` (retrying while the backend starts) and negotiates
/// features and protocol features as [`connect`] does, sending no memory
/// table: for tests that send their own.
pub fn handshake(path: &Path, queues: usize) -> anyhow::Result<Frontend> {
    let start = Instant::now();
    let mut frontend = loop {
        match Frontend::connect(path, queues as u64) {
            Ok(f) => break f,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("connect to the backend"),
        }
    };
    frontend.set_owner().context("SET_OWNER")?;
    let features = frontend.get_features().context("GET_FEATURES")?;
    if features & VIRTIO_F_VERSION_1 == 0 {
        bail!("backend does not offer VIRTIO_F_VERSION_1");
    }
    frontend
        .set_features(VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .context("SET_FEATURES")?;
    let pf = frontend
        .get_protocol_features()
        .context("GET_PROTOCOL_FEATURES")?;
    let want = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    if !pf.contains(want) {
        bail!("backend lacks protocol features: offered {pf:?}");
    }
    // RESET_DEVICE too, where offered, as QEMU takes it.
    let want = want | (pf & VhostUserProtocolFeatures::RESET_DEVICE);
    frontend
        .set_protocol_features(want)
        .context("SET_PROTOCOL_FEATURES")?;
    // As QEMU does once REPLY_ACK is negotiated: every request waits for
    // the backend's answer, so "acked" means "done".
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    Ok(frontend)
}

/// As [`connect`], with guest memory in `file` (its size is guest memory's,
/// at guest address 0).
pub fn connect_with(
    path: &Path,
    queues: usize,
    size: u16,
    file: File,
) -> anyhow::Result<TestFrontend> {
    let len = file.metadata().context("guest memory file")?.len();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        len as usize,
        Some(FileOffset::new(file.try_clone()?, 0)),
    )])
    .context("map guest memory")?;
    let frontend = handshake(path, queues)?;
    let regions = region_infos(&mem)?;
    frontend.set_mem_table(&regions).context("SET_MEM_TABLE")?;

    let mut fe = TestFrontend {
        frontend,
        mem,
        queues: Vec::new(),
        file,
    };
    for q in 0..queues {
        fe.setup_queue(q, size)?;
    }
    Ok(fe)
}

/// The memory-table entries of `mem`.
pub fn region_infos(mem: &GuestMemoryMmap) -> anyhow::Result<Vec<VhostUserMemoryRegionInfo>> {
    mem.iter()
        .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).context("region info"))
        .collect()
}

impl TestFrontend {
    fn host_addr(&self, gpa: u64) -> anyhow::Result<u64> {
        let region = self
            .mem
            .find_region(GuestAddress(gpa))
            .context("ring address outside guest memory")?;
        Ok(region.as_ptr() as u64 + (gpa - region.start_addr().0))
    }

    /// Lays out and registers queue `q` (rings at `q * 64 KiB`).
    pub fn setup_queue(&mut self, q: usize, size: u16) -> anyhow::Result<()> {
        let base = q as u64 * 0x1_0000;
        let desc = base;
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.host_addr(desc)?,
            used_ring_addr: self.host_addr(used)?,
            avail_ring_addr: self.host_addr(avail)?,
            log_addr: None,
        };
        let kick = EventFd::new(0)?;
        let call = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
        self.frontend
            .set_vring_num(q, size)
            .context("SET_VRING_NUM")?;
        self.frontend
            .set_vring_addr(q, &config)
            .context("SET_VRING_ADDR")?;
        self.frontend
            .set_vring_base(q, 0)
            .context("SET_VRING_BASE")?;
        self.frontend
            .set_vring_call(q, &call)
            .context("SET_VRING_CALL")?;
        self.frontend
            .set_vring_kick(q, &kick)
            .context("SET_VRING_KICK")?;
        self.frontend
            .set_vring_enable(q, true)
            .context("SET_VRING_ENABLE")?;
        let tq = TestQueue {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
            kick,
            call,
        };
        if q < self.queues.len() {
            self.queues[q] = tq;
        } else {
            self.queues.push(tq);
        }
        Ok(())
    }

    /// Writes a chain of raw descriptors `(addr, len, flags)` (NEXT is set
    /// for all but the last unless `raw` chains are given with explicit
    /// next fields) and makes it available. Returns the head index.
    pub fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> anyhow::Result<u16> {
        let queue = &self.queues[q];
        let size = queue.size;
        let head = queue.next_desc;
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % size;
            let next = (idx + 1) % size;
            let flags = if i + 1 < descs.len() {
                flags | VIRTQ_DESC_F_NEXT
            } else {
                *flags
            };
            self.write_desc(q, idx, *addr, *len, flags, next)?;
        }
        self.queues[q].next_desc = (head + descs.len() as u16) % size;
        self.push_avail(q, head)?;
        Ok(head)
    }

    /// Makes the chain starting at descriptor `head` available (descriptors
    /// written by hand with [`TestFrontend::write_desc`]).
    pub fn push_avail(&mut self, q: usize, head: u16) -> anyhow::Result<()> {
        let queue = &mut self.queues[q];
        let slot = queue.avail + 4 + 2 * u64::from(queue.avail_idx % queue.size);
        let (avail, new_idx) = (queue.avail, queue.avail_idx.wrapping_add(1));
        queue.avail_idx = new_idx;
        self.mem.write_obj(head, GuestAddress(slot))?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.write_obj(new_idx, GuestAddress(avail + 2))?;
        Ok(())
    }

    /// Writes one descriptor as given (for malformed-chain tests).
    pub fn write_desc(
        &self,
        q: usize,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> anyhow::Result<()> {
        let at = self.queues[q].desc + 16 * u64::from(idx);
        self.mem.write_obj(addr, GuestAddress(at))?;
        self.mem.write_obj(len, GuestAddress(at + 8))?;
        self.mem.write_obj(flags, GuestAddress(at + 12))?;
        self.mem.write_obj(next, GuestAddress(at + 14))?;
        Ok(())
    }

    /// Kicks queue `q`.
    pub fn kick(&self, q: usize) -> anyhow::Result<()> {
        self.queues[q].kick.write(1).context("kick")
    }

    /// The used ring's index as the backend last wrote it.
    pub fn used_idx(&self, q: usize) -> anyhow::Result<u16> {
        Ok(self.mem.read_obj(GuestAddress(self.queues[q].used + 2))?)
    }

    /// Waits until `n` new used entries appear on `q`; returns them as
    /// `(head, len)`.
    pub fn wait_used(
        &mut self,
        q: usize,
        n: u16,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(u16, u32)>> {
        let start = Instant::now();
        loop {
            let idx = self.used_idx(q)?;
            if idx.wrapping_sub(self.queues[q].last_used) >= n {
                break;
            }
            if start.elapsed() > timeout {
                bail!(
                    "queue {q}: {} of {n} used entries after {timeout:?}",
                    idx.wrapping_sub(self.queues[q].last_used)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut out = Vec::new();
        for _ in 0..n {
            let queue = &mut self.queues[q];
            let slot = queue.used + 4 + 8 * u64::from(queue.last_used % queue.size);
            queue.last_used = queue.last_used.wrapping_add(1);
            let id: u32 = self.mem.read_obj(GuestAddress(slot))?;
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4))?;
            out.push((id as u16, len));
        }
        Ok(out)
    }

    /// Whether the backend has signalled queue `q` since the last call.
    pub fn take_call(&self, q: usize) -> bool {
        self.queues[q].call.read().is_ok()
    }

    /// Places a virtio-blk request in slot `n` (buffers at `1 MiB * (n+1)`;
    /// slots 0 to 14 fit in [`MEM_SIZE`]): a 16-byte header (`kind`,
    /// `sector`), `data` (device-writable if `writable`, omitted if empty)
    /// and a status byte preset to 0xff. Returns the chain's head.
    pub fn push_blk(
        &mut self,
        q: usize,
        n: u64,
        kind: u32,
        sector: u64,
        data: &[u8],
        writable: bool,
    ) -> anyhow::Result<u16> {
        let BlkSlot {
            hdr,
            status,
            data: buf,
        } = blk_slot(n);
        self.mem
            .write_slice(&blk_header(kind, sector), GuestAddress(hdr))?;
        self.mem.write_obj(0xffu8, GuestAddress(status))?;
        let mut descs = vec![(hdr, 16, 0)];
        if !data.is_empty() {
            self.mem.write_slice(data, GuestAddress(buf))?;
            let flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            descs.push((buf, data.len() as u32, flags));
        }
        descs.push((status, 1, VIRTQ_DESC_F_WRITE));
        self.add_chain(q, &descs)
    }

    /// The status byte of the blk request in slot `n`.
    pub fn blk_status(&self, n: u64) -> anyhow::Result<u8> {
        Ok(self.mem.read_obj(GuestAddress(blk_slot(n).status))?)
    }

    /// `len` bytes of the data buffer of the blk request in slot `n`.
    pub fn blk_data(&self, n: u64, len: usize) -> anyhow::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(blk_slot(n).data))?;
        Ok(v)
    }
}

/// virtio-blk request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// A write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;

/// Guest addresses of a blk request's buffers in slot `n` (1 MiB apart
/// past the rings; slots 0 to 14 fit in [`MEM_SIZE`]).
#[derive(Clone, Copy, Debug)]
pub struct BlkSlot {
    /// The 16-byte header.
    pub hdr: u64,
    /// The status byte.
    pub status: u64,
    /// The data buffer.
    pub data: u64,
}

/// The buffers of blk slot `n`.
pub fn blk_slot(n: u64) -> BlkSlot {
    let base = 0x10_0000 + n * 0x10_0000;
    BlkSlot {
        hdr: base,
        status: base + 0x100,
        data: base + 0x1000,
    }
}

/// A virtio-blk request header: `kind`, reserved, `sector`.
pub fn blk_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}
