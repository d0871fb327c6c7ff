// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A mock guest for unit tests of virtio devices.
//!
//! The vhost-user server sees guest RAM twice: through vm-memory, where
//! virtio-queue walks the rings, and through the switchboard guest-memory
//! bus, where a [`Request`] leases its buffers. [`MockGuest`] builds both
//! views over one memfd, so what a device writes through a request is what
//! the driver reads back, as with a real frontend's shared memory.
//!
//! [`MockDriver`] is the driver side of one split virtqueue, on
//! virtio-queue's [`MockSplitQueue`]: it places direct and indirect
//! descriptor chains in the rings, and walks the available ring the way
//! the server's `process_queue` does, turning each chain into a
//! [`Request`]. [`MockDriver::finish`] is the server's answer path (disarm
//! the drop guard, write the used entry, drop the request, then its ticket);
//! [`Completions`] is a [`Completer`] that collects what devices answer
//! later.
//!
//! Guest layout: RAM at [`RAM_BASE`] (the rings at its start, indirect
//! tables at [`INDIRECT_BASE`], test buffers from [`DATA_BASE`]), a hole,
//! and a second RAM region at [`HIGH_RAM_BASE`].
//!
//! ```
//! # #[cfg(feature = "test-utils")] {
//! use switchboard_devices::models::virtio::mock::{Desc, MockDriver, MockGuest, DATA_BASE};
//!
//! let guest = MockGuest::new();
//! let mut driver = MockDriver::new(&guest, 0);
//! guest.write(DATA_BASE, b"hello");
//! let head = driver.add_chain(&[Desc::r(DATA_BASE, 5), Desc::w(DATA_BASE + 0x100, 8)]);
//! let mut walked = driver.walk();
//! let mut request = walked.remove(0).request.expect("a well-formed chain");
//! assert_eq!(request.head(), head);
//! let mut buf = [0u8; 5];
//! request.read_at(0, &mut buf).expect("readable bytes");
//! assert_eq!(&buf, b"hello");
//! # }
//! ```

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use actix::{Arbiter, System, SystemRunner};
use crossbeam_channel::Receiver;
use switchboard_bus::{
    BusHandle, GuestAddr, GuestMemory, MemRequest, Placement, RamRegion, RegionId, RegionKind,
    RegionSpec, Target,
};
use switchboard_runtime::Runtime;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use super::{ChainError, Completer, Request};

/// Guest-physical start of the low RAM region (the rings are here).
pub const RAM_BASE: u64 = 0;
/// Bytes of the low RAM region.
pub const RAM_SIZE: u64 = 1 << 20;
/// Where [`MockDriver::add_indirect_chain`] puts indirect tables.
pub const INDIRECT_BASE: u64 = 0x8000;
/// Where tests may put their buffers: past the rings and indirect tables.
pub const DATA_BASE: u64 = 0x1_0000;
/// Guest-physical start of the high RAM region, after a hole.
pub const HIGH_RAM_BASE: u64 = 2 << 20;
/// Bytes of the high RAM region.
pub const HIGH_RAM_SIZE: u64 = 64 << 10;
/// Descriptors in a [`MockDriver`]'s queue.
pub const QUEUE_SIZE: u16 = 16;

/// Descriptor flags (virtio 1.2, 2.7.5): the chain continues at `next`.
const VRING_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable.
const VRING_DESC_F_WRITE: u16 = 2;
/// The buffer is a table of descriptors (2.7.5.3).
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Guest RAM seen by the driver (vm-memory) and by requests (the bus).
pub struct MockGuest {
    mem: GuestMemoryMmap,
    bus: BusHandle,
    regions: Vec<Arc<RamRegion>>,
    /// Runs the bus actor while its regions are added; kept so that the
    /// actor (and the memory view it published) lives as long as the guest.
    _system: SystemRunner,
}

impl fmt::Debug for MockGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockGuest")
            .field("regions", &self.regions)
            .finish()
    }
}

impl Default for MockGuest {
    fn default() -> Self {
        Self::new()
    }
}

impl MockGuest {
    /// A zeroed guest with RAM at [`RAM_BASE`] and [`HIGH_RAM_BASE`],
    /// mirrored on a guest-memory bus. Starts its own actix system, so it
    /// must not be called inside one.
    pub fn new() -> Self {
        let fd: OwnedFd = rustix::fs::memfd_create("mock-guest", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("create the guest memfd");
        rustix::fs::ftruncate(&fd, RAM_SIZE + HIGH_RAM_SIZE).expect("size the guest memfd");
        let file = std::fs::File::from(fd);
        // (guest address, size, offset in the memfd)
        let layout = [
            (RAM_BASE, RAM_SIZE, 0),
            (HIGH_RAM_BASE, HIGH_RAM_SIZE, RAM_SIZE),
        ];
        let clone = || file.try_clone().expect("clone the guest memfd");
        let mem = GuestMemoryMmap::from_ranges_with_files(layout.iter().map(|&(at, size, off)| {
            (
                GuestAddress(at),
                size as usize,
                Some(FileOffset::new(clone(), off)),
            )
        }))
        .expect("map the guest for the driver");
        let regions: Vec<Arc<RamRegion>> = layout
            .iter()
            .map(|&(at, size, off)| {
                RamRegion::from_file(format!("guest@{at:#x}"), clone(), off, size)
                    .expect("map the guest for the bus")
            })
            .collect();
        let system = System::new();
        let bus = system.block_on(async {
            let bus = BusHandle::start(&Runtime::new(), "mock-guest", &Arbiter::current());
            for (i, (ram, &(at, _, _))) in regions.iter().zip(&layout).enumerate() {
                let spec = RegionSpec {
                    size: ram.size(),
                    kind: RegionKind::Leaf(Target::Ram(Arc::clone(ram))),
                };
                bus.add_region(RegionId(i as u64), spec, Placement::root(at, 0))
                    .await
                    .expect("add guest RAM to the bus");
            }
            bus
        });
        MockGuest {
            mem,
            bus,
            regions,
            _system: system,
        }
    }

    /// The driver's view, where the rings live.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The devices' view: the bus's guest memory.
    pub fn guest_memory(&self) -> &GuestMemory {
        self.bus.guest_memory()
    }

    /// A fresh guest-memory request, as the server starts one per chain.
    pub fn mem_request(&self) -> MemRequest {
        self.guest_memory().request()
    }

    /// The RAM regions: low, then high.
    pub fn regions(&self) -> &[Arc<RamRegion>] {
        &self.regions
    }

    /// Leases held on each region, low then high.
    pub fn leases(&self) -> Vec<u64> {
        self.regions.iter().map(|r| r.leases()).collect()
    }

    /// Writes `bytes` at `addr` as the driver would.
    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("driver write inside guest RAM");
    }

    /// Fills `len` bytes at `addr` with `byte`.
    pub fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.write(addr, &vec![byte; len]);
    }

    /// Reads `len` bytes at `addr` as the driver would.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("driver read inside guest RAM");
        buf
    }
}

/// One buffer of a chain the driver adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Desc {
    /// A driver-written (device-readable) buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: true,
        }
    }

    fn raw(self, flags: u16, next: u16) -> RawDescriptor {
        let write = if self.write { VRING_DESC_F_WRITE } else { 0 };
        RawDescriptor::from(Descriptor::new(self.addr, self.len, flags | write, next))
    }
}

/// One chain found by [`MockDriver::walk`].
#[derive(Debug)]
pub struct Walked {
    /// The chain's head index.
    pub head: u16,
    /// Its descriptors as the server passes them to [`Request::new`].
    pub descriptors: Vec<(GuestAddr, u32, bool)>,
    /// The request built from them, or why none could be.
    pub request: Result<Request, ChainError>,
}

/// The driver side of one split virtqueue, and the server's walk of it.
pub struct MockDriver<'a> {
    guest: &'a MockGuest,
    index: u16,
    ring: MockSplitQueue<'a, GuestMemoryMmap>,
    /// The device's queue, as the server holds it.
    queue: Queue,
    next_desc: u16,
    next_indirect: u64,
}

impl fmt::Debug for MockDriver<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockDriver")
            .field("index", &self.index)
            .field("next_desc", &self.next_desc)
            .finish()
    }
}

impl<'a> MockDriver<'a> {
    /// Queue `index` of [`QUEUE_SIZE`] descriptors at the start of RAM.
    pub fn new(guest: &'a MockGuest, index: u16) -> Self {
        let ring = MockSplitQueue::create(guest.memory(), GuestAddress(RAM_BASE), QUEUE_SIZE);
        let queue = ring.create_queue::<Queue>().expect("a valid mock queue");
        MockDriver {
            guest,
            index,
            ring,
            queue,
            next_desc: 0,
            next_indirect: INDIRECT_BASE,
        }
    }

    /// The queue's index (what requests report as their queue).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Makes `descs` one chain of the descriptor table and offers it in the
    /// available ring; returns its head index.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        let n = u16::try_from(descs.len()).expect("a short chain");
        assert!(
            n > 0 && u32::from(head) + u32::from(n) <= u32::from(QUEUE_SIZE),
            "the mock queue holds {QUEUE_SIZE} descriptors"
        );
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == descs.len();
                let flags = if last { 0 } else { VRING_DESC_F_NEXT };
                let next = if last { 0 } else { head + i as u16 + 1 };
                d.raw(flags, next)
            })
            .collect();
        self.ring
            .add_desc_chains(&raw, head)
            .expect("write the chain");
        self.next_desc += n;
        head
    }

    /// Offers `descs` as an indirect table: one descriptor of the queue's
    /// table pointing at them. Returns the head index.
    pub fn add_indirect_chain(&mut self, descs: &[Desc]) -> u16 {
        let table = self.next_indirect;
        let n = descs.len();
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == n;
            let flags = if last { 0 } else { VRING_DESC_F_NEXT };
            let next = if last { 0 } else { i as u16 + 1 };
            let at = GuestAddress(table + 16 * i as u64);
            self.guest
                .memory()
                .write_obj(d.raw(flags, next), at)
                .expect("write the indirect table");
        }
        self.next_indirect += 16 * n as u64;
        assert!(
            self.next_indirect <= DATA_BASE,
            "indirect tables overflow into the data area"
        );
        let head = self.next_desc;
        let len = u32::try_from(16 * n).expect("a short table");
        let raw = RawDescriptor::from(Descriptor::new(table, len, VRING_DESC_F_INDIRECT, 0));
        self.ring
            .add_desc_chains(&[raw], head)
            .expect("write the indirect head");
        self.next_desc += 1;
        head
    }

    /// Walks the available ring as the server does: collects every chain
    /// offered since the last walk, then makes each a [`Request`] over a
    /// fresh guest-memory request.
    pub fn walk(&mut self) -> Vec<Walked> {
        let chains: Vec<_> = self
            .queue
            .iter(self.guest.memory())
            .expect("the queue is ready")
            .collect();
        chains
            .into_iter()
            .map(|chain| {
                let head = chain.head_index();
                let descriptors: Vec<(GuestAddr, u32, bool)> = chain
                    .map(|d| (GuestAddr(d.addr().0), d.len(), d.is_write_only()))
                    .collect();
                let request = Request::new(
                    self.index,
                    head,
                    descriptors.iter().copied(),
                    self.guest.mem_request(),
                );
                Walked {
                    head,
                    descriptors,
                    request,
                }
            })
            .collect()
    }

    /// Walks the ring and returns the one request offered; panics if there
    /// is not exactly one, or it is malformed.
    pub fn walk_one(&mut self) -> Request {
        let mut walked = self.walk();
        assert_eq!(walked.len(), 1, "one chain offered");
        walked.remove(0).request.expect("the chain makes a request")
    }

    /// Writes a used entry.
    pub fn add_used(&mut self, head: u16, len: u32) {
        self.queue
            .add_used(self.guest.memory(), head, len)
            .expect("write the used entry");
    }

    /// Answers `request` as the server does: disarms its drop guard, writes
    /// the used entry, drops the request (and its leases), then its ticket.
    pub fn finish(&mut self, mut request: Request, len: u32) {
        let ticket = request.answered();
        self.add_used(request.head(), len);
        drop(request);
        drop(ticket);
    }

    /// The used ring as the driver sees it: `(head, len)` per entry.
    pub fn used(&self) -> Vec<(u32, u32)> {
        let n = self.ring.used().idx().load();
        (0..n)
            .map(|i| {
                let e = self
                    .ring
                    .used()
                    .ring()
                    .ref_at(usize::from(i % QUEUE_SIZE))
                    .expect("inside the used ring")
                    .load();
                (e.id(), e.len())
            })
            .collect()
    }
}

/// A [`Completer`] whose answers a test collects.
#[derive(Debug)]
pub struct Completions {
    completer: Completer,
    rx: Receiver<(Request, u32)>,
}

impl Default for Completions {
    fn default() -> Self {
        Self::new()
    }
}

impl Completions {
    /// How long [`Completions::next`] waits for a device's thread.
    pub const TIMEOUT: Duration = Duration::from_secs(10);

    /// A completer collecting into this.
    pub fn new() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Completions {
            completer: Completer::new(move |request, len| {
                // The receiver outlives every request of a test.
                let _ = tx.send((request, len));
            }),
            rx,
        }
    }

    /// The completer to hand to devices and requests.
    pub fn completer(&self) -> &Completer {
        &self.completer
    }

    /// The next answer, waiting up to [`Completions::TIMEOUT`]; panics if
    /// none comes.
    pub fn next(&self) -> (Request, u32) {
        self.rx
            .recv_timeout(Self::TIMEOUT)
            .expect("an answer through the completer")
    }

    /// Answers already sent and not yet taken.
    pub fn drain(&self) -> Vec<(Request, u32)> {
        self.rx.try_iter().collect()
    }
}
