// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest RAM: mappings, leases and the guest-memory API devices use.
//!
//! A [`RamRegion`] owns one mapping (through vm-memory). Nobody reads or writes
//! it except through a [`Lease`], and a lease can only be taken while the
//! region is not draining. The leases are counted on the region's
//! [`Gate`], the runtime's one drain primitive: taking and returning a
//! lease is an atomic add on one word, never a message.
//!
//! # The drain path of a region
//!
//! [`RamRegion::drain`] moves the region's gate to `Draining`, which closes
//! it in the same atomic word as the count. From that instant `try_lease`
//! fails for everyone, including holders of an old [`MemoryView`] snapshot.
//! The last [`Lease`] dropped (its ticket returned to the gate) wakes the
//! drain, which then resolves. After the drain future resolves, no code can
//! touch the mapping again; the mapping itself is unmapped when the last
//! `Arc` to the region goes.
//!
//! Devices get a [`GuestMemory`] handle from their bus. [`GuestMemory::request`]
//! starts a [`MemRequest`]: every region it touches is leased once, on first
//! touch, and stays leased until the request is dropped, so a request that
//! spans an asynchronous operation (a block read) holds off a drain of the
//! memory it is filling.

use std::fmt;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use switchboard_runtime::{Gate, State};
use vm_memory::{Bytes, GuestAddress, GuestRegionMmap, MemoryRegionAddress, MmapRegion};

/// A guest-physical address.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct GuestAddr(pub u64);

impl fmt::Display for GuestAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Errors of the guest-memory API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the anonymous mapping failed.
    #[error("Map {size} bytes of anonymous memory")]
    MapAnonymous {
        /// Requested size.
        size: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Creating the file-backed mapping failed.
    #[error("Map {size} bytes at file offset {offset:#x}")]
    MapFile {
        /// Requested size.
        size: u64,
        /// File offset.
        offset: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A zero-sized region was asked for.
    #[error("Zero-sized memory region")]
    ZeroSize,
    /// The region is draining and hands out no new leases.
    #[error("Memory region is draining")]
    Draining,
    /// Part of the range is not backed by any RAM region.
    #[error("Guest range {addr}+{len:#x} is not RAM")]
    Unmapped {
        /// Start of the range.
        addr: GuestAddr,
        /// Its length.
        len: u64,
    },
    /// An offset and length outside a region.
    #[error("Range +{offset:#x}+{len:#x} is outside a {size:#x}-byte region")]
    OutOfRegion {
        /// Offset into the region.
        offset: u64,
        /// Length.
        len: u64,
        /// Region size.
        size: u64,
    },
    /// A replayed request asked for guest memory its recording does not
    /// hold.
    #[error("Guest memory +{offset:#x}+{len:#x} is not in the recording")]
    NotRecorded {
        /// Offset into the request's buffers.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// The copy itself failed.
    #[error("Access guest memory at +{offset:#x}")]
    Access {
        /// Offset into the region.
        offset: u64,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result of the guest-memory API.
pub type Result<T> = std::result::Result<T, Error>;

/// Checks a requested mapping size: non-zero and addressable here.
fn mapping_len(offset: u64, size: u64) -> Result<usize> {
    if size == 0 {
        return Err(Error::ZeroSize);
    }
    usize::try_from(size).map_err(|_| Error::OutOfRegion {
        offset,
        len: size,
        size: usize::MAX as u64,
    })
}

/// One mapping of guest RAM.
pub struct RamRegion {
    name: String,
    mem: GuestRegionMmap,
    /// Counts the leases, refuses new ones once draining, and completes
    /// the drain: the runtime's one drain primitive.
    gate: Gate,
}

impl fmt::Debug for RamRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamRegion")
            .field("name", &self.name)
            .field("size", &self.size())
            .field("leases", &self.leases())
            .field("draining", &self.is_draining())
            .finish()
    }
}

impl RamRegion {
    /// Anonymous RAM of `size` bytes, zero-filled.
    pub fn anonymous(name: impl Into<String>, size: u64) -> Result<Arc<Self>> {
        let len = mapping_len(0, size)?;
        let mapping =
            MmapRegion::new(len).map_err(|source| Error::MapAnonymous { size, source })?;
        Self::from_mapping(name.into(), mapping)
    }

    /// RAM backed by `file` at `offset` (a memfd from a vhost-user frontend),
    /// mapped shared.
    pub fn from_file(
        name: impl Into<String>,
        file: std::fs::File,
        offset: u64,
        size: u64,
    ) -> Result<Arc<Self>> {
        let len = mapping_len(offset, size)?;
        let fo = vm_memory::FileOffset::new(file, offset);
        let mapping = MmapRegion::from_file(fo, len).map_err(|source| Error::MapFile {
            size,
            offset,
            source,
        })?;
        Self::from_mapping(name.into(), mapping)
    }

    fn from_mapping(name: String, mapping: MmapRegion) -> Result<Arc<Self>> {
        let size = mapping.size() as u64;
        // The region's own addresses start at 0; where it sits in a guest or
        // on a bus is the business of the map that places it.
        let mem = GuestRegionMmap::new(mapping, GuestAddress(0)).ok_or(Error::OutOfRegion {
            offset: 0,
            len: size,
            size,
        })?;
        Ok(Arc::new(RamRegion {
            gate: Gate::running(&name, 1, 1),
            name,
            mem,
        }))
    }

    /// The region's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.mem.size() as u64
    }

    /// The address of the region's first byte in this process's address
    /// space. A fault handler uses it to recognise the mapping: a frontend
    /// can shrink the file behind a region it gave, and an access past the
    /// file's new end then raises SIGBUS (see the vhost-user serving layer).
    pub fn host_addr(&self) -> usize {
        self.mem.as_ptr() as usize
    }

    /// Takes a lease, unless the region is draining.
    pub fn try_lease(self: &Arc<Self>) -> Result<Lease> {
        match self.gate.enter(0) {
            // Paired with the `leave` in the lease's drop.
            Ok(()) => Ok(Lease {
                region: Arc::clone(self),
            }),
            Err(_) => Err(Error::Draining),
        }
    }

    /// Starts draining: no new lease is handed out from now on. The returned
    /// future resolves once the last lease has been returned.
    pub fn drain(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let drained = self.gate.drained();
        async move {
            // A region cannot fail: the drain ends when the last lease goes.
            let _ = drained.await;
        }
    }

    /// Whether the region refuses new leases.
    pub fn is_draining(&self) -> bool {
        self.gate.state() != State::Running
    }

    /// Whether the region is draining and no lease is held.
    pub fn is_drained(&self) -> bool {
        self.is_draining() && self.gate.in_flight() == 0
    }

    /// Leases currently held.
    pub fn leases(&self) -> u64 {
        self.gate.in_flight()
    }
}

/// The right to touch one region's memory. Returned by dropping it.
pub struct Lease {
    /// Counted on this region's gate (`Gate::enter`) until dropped.
    region: Arc<RamRegion>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.region.gate.leave(0);
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("region", &self.region.name)
            .finish()
    }
}

impl Lease {
    /// The leased region.
    pub fn region(&self) -> &Arc<RamRegion> {
        &self.region
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.region.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRegion { offset, len, size }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` in the region.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.region
            .mem
            .read_slice(buf, MemoryRegionAddress(offset))
            .map_err(|source| Error::Access { offset, source })
    }

    /// Writes `buf` at `offset` in the region.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.region
            .mem
            .write_slice(buf, MemoryRegionAddress(offset))
            .map_err(|source| Error::Access { offset, source })
    }
}

/// One RAM-backed stretch of guest-physical space.
#[derive(Clone, Debug)]
pub struct RamRange {
    /// First guest-physical address.
    pub start: GuestAddr,
    /// Length in bytes.
    pub len: u64,
    /// The region behind it.
    pub region: Arc<RamRegion>,
    /// Offset in `region` of `start`.
    pub offset: u64,
}

/// An immutable snapshot of where RAM is, sorted by address, non-overlapping.
#[derive(Clone, Debug, Default)]
pub struct MemoryView {
    ranges: Vec<RamRange>,
}

impl MemoryView {
    /// A view from ranges; they must be sorted and must not overlap.
    pub fn new(ranges: Vec<RamRange>) -> Self {
        debug_assert!(ranges
            .windows(2)
            .all(|w| w[0].start.0.saturating_add(w[0].len) <= w[1].start.0));
        MemoryView { ranges }
    }

    /// The ranges.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    fn find(&self, addr: GuestAddr) -> Option<&RamRange> {
        let idx = self.ranges.partition_point(|r| r.start.0 <= addr.0);
        let r = self.ranges.get(idx.checked_sub(1)?)?;
        (addr.0 - r.start.0 < r.len).then_some(r)
    }
}

/// A device's handle on guest memory: the current [`MemoryView`], republished
/// by the bus on every change. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct GuestMemory {
    current: Arc<RwLock<Arc<MemoryView>>>,
}

impl GuestMemory {
    /// The view as it is now.
    pub fn snapshot(&self) -> Arc<MemoryView> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces the view. Called by the bus that owns this memory.
    pub(crate) fn publish(&self, view: MemoryView) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }

    /// Starts a request: every region it touches stays leased until it is
    /// dropped.
    pub fn request(&self) -> MemRequest {
        MemRequest {
            view: self.snapshot(),
            leases: Vec::new(),
        }
    }
}

/// The guest-memory side of one device request. See the module docs.
#[derive(Debug)]
pub struct MemRequest {
    view: Arc<MemoryView>,
    /// One lease per region touched so far; returned on drop.
    leases: Vec<Lease>,
}

impl MemRequest {
    fn lease_for(&mut self, region: &Arc<RamRegion>) -> Result<&Lease> {
        let pos = match self
            .leases
            .iter()
            .position(|l| Arc::ptr_eq(&l.region, region))
        {
            Some(pos) => pos,
            None => {
                self.leases.push(region.try_lease()?);
                self.leases.len() - 1
            }
        };
        Ok(&self.leases[pos])
    }

    /// Walks `[addr, addr+len)` range by range, calling `f(lease, region
    /// offset, position in the buffer, chunk length)`.
    fn walk(
        &mut self,
        addr: GuestAddr,
        len: u64,
        mut f: impl FnMut(&Lease, u64, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let unmapped = Error::Unmapped { addr, len };
        if addr.0.checked_add(len).is_none() {
            return Err(unmapped);
        }
        let view = Arc::clone(&self.view);
        let mut done = 0u64;
        while done < len {
            let at = GuestAddr(addr.0 + done);
            let Some(range) = view.find(at) else {
                return Err(Error::Unmapped { addr, len });
            };
            let into = at.0 - range.start.0;
            let chunk = (range.len - into).min(len - done);
            let lease = self.lease_for(&range.region)?;
            f(lease, range.offset + into, done as usize, chunk as usize)?;
            done += chunk;
        }
        Ok(())
    }

    /// Reads guest memory at `addr` into `buf`.
    pub fn read(&mut self, addr: GuestAddr, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.walk(addr, len, |lease, off, pos, n| {
            lease.read(off, &mut buf[pos..pos + n])
        })
    }

    /// Writes `buf` to guest memory at `addr`.
    pub fn write(&mut self, addr: GuestAddr, buf: &[u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.walk(addr, len, |lease, off, pos, n| {
            lease.write(off, &buf[pos..pos + n])
        })
    }

    /// Checks that `[addr, addr+len)` is guest RAM and leases every region it
    /// touches, without copying anything. A request calls this for each of
    /// its buffers before starting work, so that the regions stay leased
    /// (and a removal of them waits) until the request is dropped.
    pub fn lease_range(&mut self, addr: GuestAddr, len: u64) -> Result<()> {
        self.walk(addr, len, |_, _, _, _| Ok(()))
    }

    /// Regions leased by this request so far.
    pub fn leased(&self) -> usize {
        self.leases.len()
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn view_of(regions: &[(u64, &Arc<RamRegion>)]) -> GuestMemory {
        let mem = GuestMemory::default();
        mem.publish(MemoryView::new(
            regions
                .iter()
                .map(|(start, r)| RamRange {
                    start: GuestAddr(*start),
                    len: r.size(),
                    region: Arc::clone(r),
                    offset: 0,
                })
                .collect(),
        ));
        mem
    }

    #[test]
    fn test_drain_without_leases_completes_at_once() {
        let r = RamRegion::anonymous("r", 4096).expect("map");
        assert!(r.drain().now_or_never().is_some());
        assert!(r.is_drained());
        assert!(matches!(r.try_lease(), Err(Error::Draining)));
    }

    #[test]
    fn test_lease_held_across_drain_delays_it_until_dropped() {
        let r = RamRegion::anonymous("r", 4096).expect("map");
        let lease = r.try_lease().expect("lease");
        let mut drain = Box::pin(r.drain());
        assert!(
            (&mut drain).now_or_never().is_none(),
            "drained with a lease held"
        );
        assert!(
            matches!(r.try_lease(), Err(Error::Draining)),
            "new lease while draining"
        );
        lease
            .write(0, b"still mine")
            .expect("a held lease still works");
        drop(lease);
        assert!(drain.now_or_never().is_some());
        assert_eq!(r.leases(), 0);
    }

    #[test]
    fn test_last_of_many_leases_from_threads_completes_the_drain() {
        let r = RamRegion::anonymous("r", 4096).expect("map");
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        let leases: Vec<Lease> = (0..8).map(|_| r.try_lease().expect("lease")).collect();
        let drain = r.drain();
        let t = std::thread::spawn(move || {
            go_rx.recv().expect("go");
            drop(leases);
        });
        go_tx.send(()).expect("go");
        futures::executor::block_on(drain);
        assert!(r.is_drained());
        t.join().expect("thread");
    }

    #[test]
    fn test_request_reads_and_writes_across_two_regions() {
        let a = RamRegion::anonymous("a", 4096).expect("map");
        let b = RamRegion::anonymous("b", 4096).expect("map");
        let mem = view_of(&[(0x1000, &a), (0x2000, &b)]);
        let mut req = mem.request();
        let data: Vec<u8> = (0..32).collect();
        req.write(GuestAddr(0x1ff0), &data)
            .expect("write across the boundary");
        assert_eq!(req.leased(), 2);
        let mut back = [0u8; 32];
        req.read(GuestAddr(0x1ff0), &mut back).expect("read back");
        assert_eq!(&back[..], &data[..]);
        assert_eq!(a.leases(), 1);
        drop(req);
        assert_eq!(a.leases(), 0);
        assert_eq!(b.leases(), 0);
    }

    #[test]
    fn test_lease_range_leases_without_copying() {
        let a = RamRegion::anonymous("a", 4096).expect("map");
        let mem = view_of(&[(0x1000, &a)]);
        let mut req = mem.request();
        req.lease_range(GuestAddr(0x1800), 16).expect("in RAM");
        assert_eq!(a.leases(), 1);
        assert!(matches!(
            req.lease_range(GuestAddr(0x1ff0), 32),
            Err(Error::Unmapped { .. })
        ));
        drop(req);
        assert_eq!(a.leases(), 0);
    }

    #[test]
    fn test_request_outside_ram_is_an_error_not_a_panic() {
        let a = RamRegion::anonymous("a", 4096).expect("map");
        let mem = view_of(&[(0x1000, &a)]);
        let mut req = mem.request();
        let mut buf = [0u8; 16];
        assert!(matches!(
            req.read(GuestAddr(0x1ff8), &mut buf),
            Err(Error::Unmapped { .. })
        ));
        assert!(matches!(
            req.read(GuestAddr(0), &mut buf),
            Err(Error::Unmapped { .. })
        ));
        assert!(matches!(
            req.read(GuestAddr(u64::MAX - 4), &mut buf),
            Err(Error::Unmapped { .. })
        ));
    }

    #[test]
    fn test_stale_snapshot_cannot_lease_a_draining_region() {
        let a = RamRegion::anonymous("a", 4096).expect("map");
        let mem = view_of(&[(0, &a)]);
        let mut stale = mem.request();
        mem.publish(MemoryView::default());
        let drained = a.drain();
        let mut buf = [0u8; 4];
        assert!(matches!(
            stale.read(GuestAddr(0), &mut buf),
            Err(Error::Draining)
        ));
        // Nothing was leased: the drain completes although a stale snapshot
        // still names the region.
        futures::executor::block_on(drained);
        assert!(a.is_drained());
    }
}
