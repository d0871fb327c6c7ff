// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Virtio devices as the vhost-user server sees them.
//!
//! A [`VirtioDevice`] says what it is (type, features, queues, config space)
//! and handles one [`Request`] at a time: a descriptor chain the server
//! popped from a virtqueue, already split into the buffers the driver wrote
//! (readable) and the buffers it gave for the answer (writable), and already
//! holding a lease on every guest-RAM region those buffers touch.
//!
//! A request is answered either at once ([`Handled::Done`]) or later through
//! the [`Completer`] ([`Handled::Pending`]), from any thread. Either way the
//! server writes the used entry and only then drops the request, and with it
//! its leases: so a removal of guest memory (vhost-user REM_MEM_REG or a
//! SET_MEM_TABLE that drops a region) is answered only after every request
//! using that memory has completed and written its used entry.

use std::fmt;
use std::sync::Arc;

use switchboard_bus::{GuestAddr, MemRequest, MemoryError};

/// One guest buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddr,
    /// Length in bytes.
    pub len: u32,
}

/// Why a descriptor chain could not become a [`Request`].
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A driver-readable descriptor follows a device-writable one.
    #[error("Descriptor chain {head}: readable descriptor after a writable one")]
    ReadableAfterWritable {
        /// The chain's head index.
        head: u16,
    },
    /// The chain's buffers add up to more than the device accepts.
    #[error("Descriptor chain {head}: {len} bytes exceed the limit of {limit}")]
    TooLong {
        /// The chain's head index.
        head: u16,
        /// Total length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A buffer is not in guest RAM, or its region is being removed.
    #[error("Descriptor chain {head}: buffer {addr}+{len:#x} is not usable guest RAM")]
    Memory {
        /// The chain's head index.
        head: u16,
        /// The buffer.
        addr: GuestAddr,
        /// Its length.
        len: u32,
        /// Why.
        #[source]
        source: MemoryError,
    },
}

/// Total buffer bytes accepted in one chain: far above any real request
/// (virtio-blk's seg_max times its size_max), far below what would let a
/// guest make the backend allocate without bound.
pub const MAX_CHAIN_BYTES: u64 = 64 << 20;

/// A request popped from a virtqueue. Holds leases on its buffers' memory
/// until dropped.
pub struct Request {
    queue: u16,
    head: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    mem: MemRequest,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("queue", &self.queue)
            .field("head", &self.head)
            .field("readable", &self.readable)
            .field("writable", &self.writable)
            .finish()
    }
}

impl Request {
    /// Builds a request from a chain's descriptors `(addr, len, write_only)`,
    /// leasing every buffer through `mem`.
    pub fn new(
        queue: u16,
        head: u16,
        descriptors: impl IntoIterator<Item = (GuestAddr, u32, bool)>,
        mut mem: MemRequest,
    ) -> Result<Self, ChainError> {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut total = 0u64;
        for (addr, len, write_only) in descriptors {
            total += u64::from(len);
            if total > MAX_CHAIN_BYTES {
                return Err(ChainError::TooLong {
                    head,
                    len: total,
                    limit: MAX_CHAIN_BYTES,
                });
            }
            if !write_only && !writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable { head });
            }
            mem.lease_range(addr, u64::from(len))
                .map_err(|source| ChainError::Memory {
                    head,
                    addr,
                    len,
                    source,
                })?;
            let seg = Segment { addr, len };
            if write_only {
                writable.push(seg);
            } else {
                readable.push(seg);
            }
        }
        Ok(Request {
            queue,
            head,
            readable,
            writable,
            mem,
        })
    }

    /// The virtqueue it came from.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// The chain's head index (what the used entry names).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The driver-written buffers, in order.
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }

    /// The device-writable buffers, in order.
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }

    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Copies readable bytes starting `offset` bytes into the readable
    /// buffers into `buf`. Fails if they are fewer than `buf.len()`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        for (addr, n) in Self::spans(&self.readable, offset, buf.len() as u64)? {
            self.mem.read(addr, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Copies `buf` into the writable buffers, starting `offset` bytes in.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        for (addr, n) in Self::spans(&self.writable, offset, buf.len() as u64)? {
            self.mem.write(addr, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// The pieces of `segs` covering `[offset, offset+len)`.
    fn spans(
        segs: &[Segment],
        offset: u64,
        len: u64,
    ) -> Result<Vec<(GuestAddr, usize)>, MemoryError> {
        let mut out = Vec::new();
        let mut skip = offset;
        let mut left = len;
        for s in segs {
            if left == 0 {
                break;
            }
            let seg_len = u64::from(s.len);
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(left);
            out.push((GuestAddr(s.addr.0 + skip), n as usize));
            left -= n;
            skip = 0;
        }
        if left > 0 {
            return Err(MemoryError::OutOfRegion {
                offset,
                len,
                size: segs.iter().map(|s| u64::from(s.len)).sum(),
            });
        }
        Ok(out)
    }
}

/// How a device handled a request.
#[derive(Debug)]
pub enum Handled {
    /// Answered: `len` bytes were written to the writable buffers.
    Done {
        /// The request, returned so the server writes its used entry
        /// before the request (and its leases) are dropped.
        request: Request,
        /// Bytes written.
        len: u32,
    },
    /// The device keeps the request and answers through the [`Completer`].
    Pending,
}

/// Where a device sends requests it answers later. Cheap to clone; usable
/// from any thread.
#[derive(Clone)]
pub struct Completer {
    inner: Arc<dyn Fn(Request, u32) + Send + Sync>,
}

impl fmt::Debug for Completer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Completer")
    }
}

impl Completer {
    /// A completer calling `f` with each finished request and its length.
    pub fn new(f: impl Fn(Request, u32) + Send + Sync + 'static) -> Self {
        Completer { inner: Arc::new(f) }
    }

    /// Answers `request` with `len` bytes written.
    pub fn complete(&self, request: Request, len: u32) {
        (self.inner)(request, len)
    }
}

/// A virtio device served over vhost-user.
///
/// # Lifecycle contract
///
/// - `device_type`, `num_queues`, `device_features` and `config` may be
///   called at any time from the vhost-user thread.
/// - `handle` is called on a queue's worker thread, one request at a time
///   per queue; queues may be on different workers.
/// - `reset` is called with no request in flight (after the server drained
///   every queue), when the frontend resets the device or disconnects.
pub trait VirtioDevice: Send + Sync + 'static {
    /// A short name for logs (`virtio-rng`).
    fn kind(&self) -> &'static str;
    /// The virtio device ID (virtio 1.2 section 5).
    fn device_type(&self) -> u32;
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// Largest queue size accepted.
    fn queue_size(&self) -> u16 {
        256
    }
    /// Device-specific feature bits (the server adds the transport ones).
    fn device_features(&self) -> u64;
    /// The device configuration space.
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Handles one request.
    fn handle(&self, request: Request, done: &Completer) -> Handled;
    /// Called after each batch of requests a kick brought on `queue`, on that queue's worker: a device that stages
    /// requests in `handle` hands them on here, in one go.
    fn end_batch(&self, _queue: u16) {}
    /// A request whose chain was malformed: answer what can be answered
    /// (a status byte, say). The default writes nothing.
    fn reject(&self, _queue: u16, _head: u16, _error: &ChainError) {}
    /// Forgets per-connection state.
    fn reset(&self) {}
}
