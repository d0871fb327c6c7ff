// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! In-flight I/O tracking: `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, split
//! virtqueues.
//!
//! A backend that dies (SIGKILL, a crash, a contained panic) loses the
//! requests it had popped from the available ring but not answered; the
//! frontend's ring position no longer tells which were answered, because
//! requests complete out of order. The protocol's remedy is a shared
//! region the backend writes as it works and the frontend keeps across the
//! backend's death (it holds the file):
//!
//! - GET_INFLIGHT_FD: the backend creates the file (here a memfd, sealed
//!   against shrinking and growing) and returns it; the frontend keeps it.
//! - SET_INFLIGHT_FD: every time the frontend starts the device, on every
//!   connection, it hands the file back; the backend maps it.
//!
//! One region per queue, `ALIGN_UP(16 + 16 * queue_size, 64)` bytes, as
//! the vhost-user specification lays it out:
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
//! then desc_num times: u8 inflight | u8 pad[5] | u16 next | u64 counter
//! ```
//!
//! The rules, per queue (only its worker thread writes its region):
//!
//! - a head is marked (`inflight = 1`, `counter` = the queue's next
//!   counter) as it is popped, before anything handles it;
//! - before its used entry is written, `last_batch_head` = the head; after
//!   the used index is published, its mark is cleared and `used_idx` = the
//!   new used index.
//!
//! On the first kick after SET_INFLIGHT_FD ([`QueueInflight::recover`]):
//! a fresh region (version 0) is initialised; otherwise a used index in
//! the ring that differs from `used_idx` means the backend died between
//! publishing an entry and clearing its mark, so `last_batch_head`'s mark
//! is cleared; the marked heads are the requests in flight, the ring's
//! next available position is `used_idx + in flight` (whatever
//! SET_VRING_BASE said), and the marked heads are resubmitted in the order
//! of their counters before any new request.
//!
//! Trust: the frontend can write the region at any time. What it can do
//! with that is what it can do with the rings: make the backend walk
//! chains it names, which are checked as any chain is. It cannot make the
//! backend fault: a region is mapped only from a file sealed against
//! shrinking (`F_SEAL_SHRINK`, which the files this backend creates carry)
//! and at least as large as the region, and every index read from it is
//! bounded by the queue size.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{MemfdFlags, SealFlags};
use switchboard_bus::GuestAddr;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The layout version this backend writes into a fresh region.
pub(crate) const VERSION: u16 = 1;
/// The queue region's header: features, version, desc_num,
/// last_batch_head, used_idx.
const HEADER: usize = 16;
/// One descriptor's state.
const DESC: usize = 16;
/// Every queue region starts on this boundary.
const ALIGN: usize = 64;
/// The largest split virtqueue (virtio 1.2, 2.7).
pub(crate) const MAX_QUEUE_SIZE: u16 = 32768;

/// The bytes of one queue's region for `queue_size` descriptors.
pub(crate) fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// Why a GET_INFLIGHT_FD or SET_INFLIGHT_FD was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InflightError {
    /// The queue count is 0 or more than the device has.
    #[error("{num_queues} queues asked, the device has {max}")]
    Queues {
        /// Asked.
        num_queues: u16,
        /// The device's.
        max: usize,
    },
    /// The queue size is 0 or past the largest split virtqueue.
    #[error("queue size {0} (it must be 1 to 32768)")]
    QueueSize(u16),
    /// The region is smaller than its queues need.
    #[error("region of {mmap_size} bytes, {need} needed for {num_queues} queues of {queue_size}")]
    TooSmall {
        /// Declared size.
        mmap_size: u64,
        /// Needed size.
        need: u64,
        /// Queues.
        num_queues: u16,
        /// Descriptors per queue.
        queue_size: u16,
    },
    /// The offset is not page-aligned, or offset plus size overflows or
    /// runs past the end of the file.
    #[error("region at offset {offset}, {size} bytes, does not fit a file of {file} bytes (or is not page-aligned)")]
    OutOfFile {
        /// Offset.
        offset: u64,
        /// Size.
        size: u64,
        /// The file's size.
        file: u64,
    },
    /// The file can still shrink under the mapping.
    #[error("the file is not sealed against shrinking (F_SEAL_SHRINK)")]
    NotSealed,
    /// A system call failed.
    #[error("{what}")]
    Io {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> InflightError {
    move |e| InflightError::Io {
        what,
        source: e.into(),
    }
}

/// Creates the file GET_INFLIGHT_FD returns: zeroed (version 0: nothing in
/// flight), sized for `num_queues` queues of `queue_size`, sealed so that
/// it can neither shrink nor grow. Returns the file and its size.
pub(crate) fn create(
    num_queues: u16,
    queue_size: u16,
    max_queues: usize,
) -> Result<(File, u64), InflightError> {
    check_shape(num_queues, queue_size, max_queues)?;
    let size = (usize::from(num_queues) * queue_region_size(queue_size)) as u64;
    let fd = rustix::fs::memfd_create(
        "switchboard-inflight",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(io_err("create the in-flight memfd"))?;
    rustix::fs::ftruncate(&fd, size).map_err(io_err("size the in-flight memfd"))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
        .map_err(io_err("seal the in-flight memfd"))?;
    Ok((File::from(fd), size))
}

fn check_shape(num_queues: u16, queue_size: u16, max_queues: usize) -> Result<(), InflightError> {
    if num_queues == 0 || usize::from(num_queues) > max_queues {
        return Err(InflightError::Queues {
            num_queues,
            max: max_queues,
        });
    }
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::QueueSize(queue_size));
    }
    Ok(())
}

/// A mapped in-flight file: one region per queue.
pub(crate) struct Inflight {
    base: NonNull<u8>,
    len: usize,
    queue_size: u16,
    queues: Vec<QueueState>,
}

/// What this process keeps per queue beside the shared region.
struct QueueState {
    /// The next counter to mark a head with.
    counter: AtomicU64,
    /// Set by SET_INFLIGHT_FD; the queue's first walk recovers and clears
    /// it.
    recover: AtomicBool,
}

// SAFETY: `base` points into a MAP_SHARED mapping owned by this value
// (unmapped only in its drop) that is only ever accessed through atomic
// loads and stores at in-bounds, naturally aligned offsets (see `at`);
// nothing else in the value is thread-bound.
#[allow(unsafe_code)]
unsafe impl Send for Inflight {}
// SAFETY: as for Send: every access through `base` is atomic.
#[allow(unsafe_code)]
unsafe impl Sync for Inflight {}

impl std::fmt::Debug for Inflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflight")
            .field("queues", &self.queues.len())
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl Inflight {
    /// Maps the file SET_INFLIGHT_FD handed over, after checking that the
    /// region fits the file, that the file cannot shrink, and that the
    /// region holds `num_queues` queues of `queue_size`.
    pub(crate) fn map(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
    ) -> Result<Self, InflightError> {
        check_shape(num_queues, queue_size, max_queues)?;
        let need = (usize::from(num_queues) * queue_region_size(queue_size)) as u64;
        if mmap_size < need {
            return Err(InflightError::TooSmall {
                mmap_size,
                need,
                num_queues,
                queue_size,
            });
        }
        let file_size = rustix::fs::fstat(file)
            .map_err(io_err("fstat the in-flight file"))?
            .st_size as u64;
        let page = rustix::param::page_size() as u64;
        let fits = mmap_offset
            .checked_add(mmap_size)
            .is_some_and(|end| end <= file_size);
        if !fits || mmap_offset % page != 0 || usize::try_from(mmap_size).is_err() {
            return Err(InflightError::OutOfFile {
                offset: mmap_offset,
                size: mmap_size,
                file: file_size,
            });
        }
        if !super::memory::sealed(file) {
            return Err(InflightError::NotSealed);
        }
        let len = mmap_size as usize;
        let offset = libc::off_t::try_from(mmap_offset).map_err(|_| InflightError::OutOfFile {
            offset: mmap_offset,
            size: mmap_size,
            file: file_size,
        })?;
        // SAFETY: a fresh shared mapping chosen by the kernel (no fixed
        // address, so nothing existing is replaced) of `len` bytes of an
        // open file; the result is checked below, and the mapping is
        // owned by the returned value, which unmaps it in its drop.
        #[allow(unsafe_code)]
        let mapped = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(InflightError::Io {
                what: "map the in-flight file",
                source: io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(mapped.cast::<u8>()).ok_or(InflightError::Io {
            what: "map the in-flight file",
            source: io::Error::other("mapped at address 0"),
        })?;
        let queues = (0..num_queues)
            .map(|_| QueueState {
                counter: AtomicU64::new(0),
                recover: AtomicBool::new(true),
            })
            .collect();
        Ok(Inflight {
            base,
            len,
            queue_size,
            queues,
        })
    }

    /// Queue `index`'s region, if the file has one for it.
    pub(crate) fn queue(&self, index: usize) -> Option<QueueInflight<'_>> {
        let state = self.queues.get(index)?;
        Some(QueueInflight {
            owner: self,
            offset: index * queue_region_size(self.queue_size),
            state,
        })
    }

    /// An atomic view of the `T` at `offset`.
    fn at<T>(&self, offset: usize) -> &T {
        let size = std::mem::size_of::<T>();
        assert!(
            offset % size == 0 && offset + size <= self.len,
            "in-flight access out of bounds"
        );
        // SAFETY: in bounds of the mapping and aligned to the size of `T`
        // (checked above; the mapping is page-aligned), and `T` is only
        // ever one of the atomic integer types, which have the size and
        // alignment of their integer and are valid for any bit pattern.
        // The mapping lives as long as `self` (unmapped in drop), so the
        // reference cannot outlive it. Another process may write the same
        // bytes concurrently: atomics make that a race on values, not
        // undefined behaviour in this process.
        #[allow(unsafe_code)]
        unsafe {
            &*self.base.as_ptr().add(offset).cast::<T>()
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` are exactly the mapping `map` made, and
        // no reference into it outlives `self` (see `at`).
        #[allow(unsafe_code)]
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// One queue's in-flight region.
pub(crate) struct QueueInflight<'a> {
    owner: &'a Inflight,
    offset: usize,
    state: &'a QueueState,
}

/// What recovering a queue found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// The ring's next available position.
    pub(crate) next_avail: u16,
    /// The heads still in flight, in counter order: to be resubmitted
    /// before any new request.
    pub(crate) resubmit: Vec<u16>,
    /// Whether `last_batch_head`'s mark was cleared (the backend died
    /// between publishing a used entry and clearing its mark).
    pub(crate) cleared_last: bool,
}

impl QueueInflight<'_> {
    fn version(&self) -> &AtomicU16 {
        self.owner.at(self.offset + 8)
    }
    fn desc_num(&self) -> &AtomicU16 {
        self.owner.at(self.offset + 10)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.owner.at(self.offset + 12)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.owner.at(self.offset + 14)
    }
    fn flag(&self, head: u16) -> Option<&AtomicU8> {
        (head < self.owner.queue_size).then(|| {
            self.owner
                .at(self.offset + HEADER + DESC * usize::from(head))
        })
    }
    fn counter(&self, head: u16) -> Option<&AtomicU64> {
        (head < self.owner.queue_size).then(|| {
            self.owner
                .at(self.offset + HEADER + DESC * usize::from(head) + 8)
        })
    }

    /// Whether this queue has to recover before its next walk; clears it.
    pub(crate) fn take_recover(&self) -> bool {
        self.state.recover.swap(false, Ordering::AcqRel)
    }

    /// Recovers after SET_INFLIGHT_FD, given the used index in the ring
    /// and the ring's size: see the module's documentation.
    pub(crate) fn recover(&self, ring_used_idx: u16, ring_size: u16) -> Recovered {
        if self.version().load(Ordering::Acquire) == 0 {
            self.desc_num()
                .store(self.owner.queue_size, Ordering::Relaxed);
            self.used_idx().store(ring_used_idx, Ordering::Relaxed);
            self.version().store(VERSION, Ordering::Release);
            self.state.counter.store(0, Ordering::Relaxed);
            return Recovered {
                next_avail: ring_used_idx,
                ..Recovered::default()
            };
        }
        let mut cleared_last = false;
        if self.used_idx().load(Ordering::Acquire) != ring_used_idx {
            if let Some(f) = self.flag(self.last_batch_head().load(Ordering::Relaxed)) {
                f.store(0, Ordering::Release);
            }
            self.used_idx().store(ring_used_idx, Ordering::Release);
            cleared_last = true;
        }
        let heads = self.owner.queue_size.min(ring_size);
        let mut marked: Vec<(u64, u16)> = (0..heads)
            .filter(|&h| self.flag(h).is_some_and(|f| f.load(Ordering::Acquire) == 1))
            .map(|h| (self.counter(h).map_or(0, |c| c.load(Ordering::Relaxed)), h))
            .collect();
        // Heads marked but past the ring's size cannot be requests of it.
        for h in heads..self.owner.queue_size {
            if let Some(f) = self.flag(h) {
                f.store(0, Ordering::Relaxed);
            }
        }
        marked.sort_unstable();
        let next = marked.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        self.state.counter.store(next, Ordering::Relaxed);
        Recovered {
            // At most the queue size is in flight, so this cannot wrap
            // past a full ring.
            next_avail: ring_used_idx.wrapping_add(marked.len() as u16),
            resubmit: marked.iter().map(|&(_, h)| h).collect(),
            cleared_last,
        }
    }

    /// Marks `head` in flight as it is popped.
    pub(crate) fn mark(&self, head: u16) {
        if let (Some(f), Some(c)) = (self.flag(head), self.counter(head)) {
            let counter = self.state.counter.fetch_add(1, Ordering::Relaxed);
            c.store(counter, Ordering::Relaxed);
            f.store(1, Ordering::Release);
        }
    }

    /// Before `head`'s used entry is written. Release stores keep the
    /// order of this process's writes to the region and the ring, which is
    /// all a reader needs: the region is read only by the next backend,
    /// after this one is gone (a killed process's stores to shared memory
    /// are not lost), so no fence is needed.
    pub(crate) fn before_used(&self, head: u16) {
        self.last_batch_head().store(head, Ordering::Release);
    }

    /// After `head`'s used entry and the used index `used_idx` are
    /// published.
    pub(crate) fn after_used(&self, head: u16, used_idx: u16) {
        if let Some(f) = self.flag(head) {
            f.store(0, Ordering::Release);
        }
        self.used_idx().store(used_idx, Ordering::Release);
    }

    /// Whether `head` is marked in flight.
    #[cfg(test)]
    pub(crate) fn is_marked(&self, head: u16) -> bool {
        self.flag(head)
            .is_some_and(|f| f.load(Ordering::Acquire) == 1)
    }
}

/// The descriptors of the chain whose head is `head` in the descriptor
/// table at `table` of a ring of `size`, as `(address, length,
/// device-writable)`: how a resubmitted request is read again (the ring
/// walker's iterator only reads heads from the available ring). The walk
/// ends, as the ring walker's does, at the first descriptor that cannot be
/// read, a second level of indirection, an indirect table whose length is
/// not a multiple of 16, or after as many descriptors as its table holds;
/// `Request::new` then checks what was read.
pub(crate) fn chain_at(
    mem: &GuestMemoryMmap,
    table: u64,
    size: u16,
    head: u16,
) -> Vec<(GuestAddr, u32, bool)> {
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;
    let mut out = Vec::new();
    let (mut table, mut size, mut index) = (table, size, head);
    let mut left = size;
    let mut indirect = false;
    let mut total = 0u64;
    while left > 0 && index < size {
        let Some(at) = table.checked_add(u64::from(index) * 16) else {
            break;
        };
        let Ok(d) = mem.read_obj::<Descriptor>(GuestAddress(at)) else {
            break;
        };
        if d.flags() & F_INDIRECT != 0 {
            if indirect || d.len() % 16 != 0 || d.len() / 16 > u32::from(u16::MAX) {
                break;
            }
            indirect = true;
            table = d.addr().0;
            size = (d.len() / 16) as u16;
            left = size;
            index = 0;
            continue;
        }
        total += u64::from(d.len());
        if total > u64::from(u32::MAX) {
            break;
        }
        out.push((GuestAddr(d.addr().0), d.len(), d.flags() & F_WRITE != 0));
        if d.flags() & F_NEXT == 0 {
            break;
        }
        index = d.next();
        left -= 1;
    }
    out
}

/// The current connection's in-flight file, shared by the message filter
/// (which sets it on SET_INFLIGHT_FD) and the queue workers.
#[derive(Default)]
pub(crate) struct Slot {
    current: Mutex<Option<Arc<Inflight>>>,
}

impl Slot {
    /// The current file, if the frontend handed one over.
    pub(crate) fn get(&self) -> Option<Arc<Inflight>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes `inflight` the current file.
    pub(crate) fn set(&self, inflight: Inflight) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(inflight));
    }

    /// Forgets the file (the connection ended).
    pub(crate) fn clear(&self) {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(queues: u16, size: u16) -> (File, Inflight) {
        let (file, len) = create(queues, size, 4).expect("create");
        let map = Inflight::map(&file, len, 0, queues, size, 4).expect("map");
        (file, map)
    }

    #[test]
    fn test_queue_region_size_is_aligned_and_holds_every_descriptor() {
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256) % 64, 0);
        assert!(queue_region_size(256) >= 16 + 16 * 256);
    }

    #[test]
    fn test_fresh_region_recovers_nothing_and_is_initialised() {
        let (_f, map) = mapped(1, 8);
        let q = map.queue(0).expect("in-flight test");
        assert!(q.take_recover());
        assert!(!q.take_recover());
        assert_eq!(
            q.recover(5, 8),
            Recovered {
                next_avail: 5,
                resubmit: vec![],
                cleared_last: false
            }
        );
        assert_eq!(q.version().load(Ordering::Relaxed), VERSION);
    }

    #[test]
    fn test_marked_heads_are_resubmitted_in_counter_order_after_a_restart() {
        let (file, first) = mapped(1, 8);
        let q = first.queue(0).expect("in-flight test");
        q.recover(0, 8);
        // Popped 3, 5, 1, 6; 5 answered (used index 1).
        for h in [3, 5, 1, 6] {
            q.mark(h);
        }
        q.before_used(5);
        q.after_used(5, 1);
        drop(first);
        // A new process maps the same file.
        let again =
            Inflight::map(&file, queue_region_size(8) as u64, 0, 1, 8, 4).expect("in-flight test");
        let q = again.queue(0).expect("in-flight test");
        let r = q.recover(1, 8);
        assert_eq!(r.next_avail, 4);
        assert!(!r.cleared_last);
        assert_eq!(r.resubmit, vec![3, 1, 6]);
        // New marks count on from the largest counter.
        q.mark(2);
        assert_eq!(
            q.counter(2)
                .expect("in-flight test")
                .load(Ordering::Relaxed),
            4
        );
    }

    #[test]
    fn test_death_between_publishing_and_clearing_clears_the_last_head() {
        let (file, first) = mapped(1, 8);
        let q = first.queue(0).expect("in-flight test");
        q.recover(0, 8);
        q.mark(2);
        q.mark(4);
        // Died after the used index reached 1 but before 4's mark was
        // cleared.
        q.before_used(4);
        drop(first);
        let again =
            Inflight::map(&file, queue_region_size(8) as u64, 0, 1, 8, 4).expect("in-flight test");
        let q = again.queue(0).expect("in-flight test");
        let r = q.recover(1, 8);
        assert!(r.cleared_last);
        assert_eq!(r.next_avail, 2);
        assert_eq!(r.resubmit, vec![2]);
        assert!(!q.is_marked(4));
    }

    #[test]
    fn test_heads_past_the_ring_size_are_dropped_not_resubmitted() {
        let (_f, map) = mapped(1, 16);
        let q = map.queue(0).expect("in-flight test");
        q.recover(0, 16);
        q.mark(3);
        q.mark(12);
        let r = q.recover(0, 8);
        assert_eq!(r.resubmit, vec![3]);
        assert!(!q.is_marked(12));
    }

    #[test]
    fn test_bad_shapes_and_files_are_refused_with_what_was_wrong() {
        assert!(matches!(create(0, 8, 4), Err(InflightError::Queues { .. })));
        assert!(matches!(create(5, 8, 4), Err(InflightError::Queues { .. })));
        assert!(matches!(create(1, 0, 4), Err(InflightError::QueueSize(0))));
        let (file, len) = create(1, 8, 4).expect("in-flight test");
        assert!(matches!(
            Inflight::map(&file, len - 1, 0, 1, 8, 4),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            Inflight::map(&file, len, u64::MAX - 1, 1, 8, 4),
            Err(InflightError::OutOfFile { .. })
        ));
        assert!(matches!(
            Inflight::map(&file, len + 4096, 0, 1, 8, 4),
            Err(InflightError::OutOfFile { .. })
        ));
        let unsealed = rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC).expect("in-flight test");
        rustix::fs::ftruncate(&unsealed, len).expect("in-flight test");
        let e = Inflight::map(&File::from(unsealed), len, 0, 1, 8, 4).expect_err("refused");
        assert!(e.to_string().contains("F_SEAL_SHRINK"), "{e}");
    }

    #[test]
    fn test_an_index_past_the_region_is_ignored_not_written() {
        let (_f, map) = mapped(1, 4);
        let q = map.queue(0).expect("in-flight test");
        q.recover(0, 4);
        q.mark(9);
        q.before_used(9);
        q.after_used(9, 1);
        assert!(map.queue(1).is_none());
    }
}
