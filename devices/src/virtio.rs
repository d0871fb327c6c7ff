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

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use switchboard_bus::{GuestAddr, MemRequest, MemoryError};
use switchboard_runtime::recording::{hash, Data, DataMode};
use switchboard_runtime::{Gate, Seq, Ticket};

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
///
/// # Answered exactly once
///
/// A live request carries the [`Ticket`] its device's gate admitted it
/// with, and the [`Completer`] of its queue. It is answered by handing it
/// back to the server ([`Handled::Done`] or [`Completer::complete`]), which
/// writes its used entry and only then drops the ticket. A request dropped
/// any other way (a panic in the device, an early return, a lost
/// completion) answers itself in its drop guard: it writes the device
/// type's failure status into its last writable byte, if the device type
/// has one (virtio-blk's IOERR), and sends itself to its completer with
/// that length, so that the used entry is still written and the queue's
/// count still reaches zero.
pub struct Request {
    queue: u16,
    head: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    /// Guest memory; `None` for a replayed request, whose memory is its
    /// recording.
    mem: Option<MemRequest>,
    tape: Tape,
    /// The admission: counted in flight on the device's gate until dropped.
    ticket: Option<Ticket>,
    /// Where the drop guard sends an unanswered request; `None` once the
    /// request is answered, and for replayed requests.
    guard: Option<Completer>,
    /// Written into the last writable byte when the drop guard answers.
    fail_status: Option<u8>,
}

impl Drop for Request {
    fn drop(&mut self) {
        let Some(completer) = self.guard.take() else {
            return;
        };
        let writable = self.writable_len();
        let len = match self.fail_status {
            Some(status) if writable > 0 => match self.write_at(writable - 1, &[status]) {
                Ok(()) => 1,
                Err(_) => 0,
            },
            _ => 0,
        };
        tracing::warn!(
            queue = self.queue,
            head = self.head,
            len,
            "request dropped unanswered; answered with the failure status"
        );
        let orphan = Request {
            queue: self.queue,
            head: self.head,
            readable: std::mem::take(&mut self.readable),
            writable: std::mem::take(&mut self.writable),
            mem: self.mem.take(),
            tape: std::mem::replace(&mut self.tape, Tape::Off),
            ticket: self.ticket.take(),
            guard: None,
            fail_status: None,
        };
        completer.complete(orphan, len);
    }
}

/// Guest memory the handler read or wrote, `at` bytes into the readable
/// (or writable) buffers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct At {
    /// Offset into the buffers.
    pub at: u64,
    /// The bytes.
    pub data: Data,
}

/// An input from outside the guest (file contents, entropy) or an effect
/// on the outside (a file write), with its outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct External {
    /// What it is: `file-read`, `entropy`, `file-write`, `flush`, ...
    pub what: String,
    /// Where (a file offset), when that means something.
    #[serde(default)]
    pub at: u64,
    /// How many bytes it covers.
    #[serde(default)]
    pub len: u64,
    /// The bytes read (an input) or written (an effect), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Data>,
    /// The OS error it failed with, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
}

/// Everything a request's handler exchanged with the world.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Guest-memory reads, in order.
    #[serde(default)]
    pub reads: Vec<At>,
    /// Inputs from outside, in order.
    #[serde(default)]
    pub inputs: Vec<External>,
    /// Guest-memory writes, in order.
    #[serde(default)]
    pub writes: Vec<At>,
    /// Effects on the outside, in order.
    #[serde(default)]
    pub effects: Vec<External>,
}

/// What a replayed request did, to compare with its recording.
#[derive(Debug)]
pub struct Replayed {
    /// The message type the device gave it.
    pub kind: &'static str,
    /// Its guest-memory writes and effects.
    pub trace: Trace,
    /// The first place it asked for something the recording does not
    /// have (a read at another offset, an input of another kind).
    pub divergence: Option<String>,
}

enum Tape {
    Off,
    Record(Box<Recording>),
    Replay(Box<Replaying>),
}

struct Recording {
    mode: DataMode,
    time: u64,
    kind: &'static str,
    trace: Trace,
}

struct Replaying {
    mode: DataMode,
    kind: &'static str,
    expected: Trace,
    next_read: usize,
    next_input: usize,
    next_effect: usize,
    actual: Trace,
    /// Hash of the stand-in bytes handed out for hashed data -> the
    /// recorded hash: so that data copied through unchanged compares equal.
    fills: HashMap<u128, u128>,
    divergence: Option<String>,
}

impl Replaying {
    fn diverge(&mut self, why: String) {
        if self.divergence.is_none() {
            self.divergence = Some(why);
        }
    }

    /// Fills `buf` with the recorded `data`: its bytes, or for hashed data
    /// stand-in bytes derived from the hash, remembered so that a copy of
    /// them compares equal to the recorded hash.
    fn fill(&mut self, data: &Data, buf: &mut [u8]) {
        match data {
            Data::Bytes(b) => buf.copy_from_slice(b),
            Data::Hash { hash: h, .. } => {
                let mut x = (*h as u64) ^ ((*h >> 64) as u64) | 1;
                for chunk in buf.chunks_mut(8) {
                    // xorshift64: any fixed expansion of the hash will do.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = x.to_le_bytes();
                    chunk.copy_from_slice(&b[..chunk.len()]);
                }
                self.fills.insert(hash(buf), *h);
            }
        }
    }

    /// `bytes` as the recording would hold them. (Stand-in bytes exist only
    /// for hashed data, which is never small, so only hashes translate.)
    fn capture(&self, bytes: &[u8]) -> Data {
        match Data::capture(self.mode, bytes) {
            Data::Hash { len, hash } => Data::Hash {
                len,
                hash: self.fills.get(&hash).copied().unwrap_or(hash),
            },
            d => d,
        }
    }
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The error a replayed request gets where it left its recording.
fn off_the_record() -> io::Error {
    io::Error::other("replay: not in the recording")
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
            mem: Some(mem),
            tape: Tape::Off,
            ticket: None,
            guard: None,
            fail_status: None,
        })
    }

    /// Arms the drop guard: from now on this request answers itself
    /// through `completer` if it is dropped unanswered, with `fail_status`
    /// in its last writable byte (if given). `ticket` is its admission,
    /// held until the answer's used entry is written.
    pub fn admitted(&mut self, ticket: Ticket, completer: &Completer, fail_status: Option<u8>) {
        self.ticket = Some(ticket);
        self.guard = Some(completer.clone());
        self.fail_status = fail_status;
    }

    /// Disarms the drop guard and takes the admission out: the server
    /// calls this when it writes the used entry.
    pub fn answered(&mut self) -> Option<Ticket> {
        self.guard = None;
        self.ticket.take()
    }

    /// The gate that admitted it, if it was admitted: a thread that runs
    /// the request elsewhere (an I/O thread) fails the device through it
    /// when it catches a panic.
    pub fn gate(&self) -> Option<Gate> {
        self.ticket.as_ref().map(|t| t.gate().clone())
    }

    /// The request's sequence number, if it was admitted.
    pub fn seq(&self) -> Option<Seq> {
        self.ticket.as_ref().map(Ticket::seq)
    }

    /// A request rebuilt from its recording: buffers of the recorded sizes,
    /// whose reads and inputs return the recorded data and whose writes
    /// and effects are kept for [`Request::replayed`].
    pub fn replay(
        queue: u16,
        head: u16,
        readable: &[u32],
        writable: &[u32],
        expected: Trace,
        mode: DataMode,
    ) -> Self {
        let segs = |lens: &[u32]| {
            lens.iter()
                .map(|&len| Segment {
                    addr: GuestAddr(0),
                    len,
                })
                .collect()
        };
        Request {
            queue,
            head,
            readable: segs(readable),
            writable: segs(writable),
            mem: None,
            ticket: None,
            guard: None,
            fail_status: None,
            tape: Tape::Replay(Box::new(Replaying {
                mode,
                kind: "request",
                expected,
                next_read: 0,
                next_input: 0,
                next_effect: 0,
                actual: Trace::default(),
                fills: HashMap::new(),
                divergence: None,
            })),
        }
    }

    /// Starts recording what the handler does with this request; `time`
    /// is its delivery time.
    pub fn record(&mut self, mode: DataMode, time: u64) {
        self.tape = Tape::Record(Box::new(Recording {
            mode,
            time,
            kind: "request",
            trace: Trace::default(),
        }));
    }

    /// The recording made since [`Request::record`]: delivery time, type
    /// and trace.
    pub fn take_recording(&mut self) -> Option<(u64, &'static str, Trace)> {
        match std::mem::replace(&mut self.tape, Tape::Off) {
            Tape::Record(r) => Some((r.time, r.kind, r.trace)),
            other => {
                self.tape = other;
                None
            }
        }
    }

    /// What a replayed request did.
    pub fn replayed(&mut self) -> Option<Replayed> {
        match std::mem::replace(&mut self.tape, Tape::Off) {
            Tape::Replay(r) => Some(Replayed {
                kind: r.kind,
                trace: r.actual,
                divergence: r.divergence,
            }),
            other => {
                self.tape = other;
                None
            }
        }
    }

    /// Names the message type (`read`, `flush`) for the log.
    pub fn set_kind(&mut self, kind: &'static str) {
        match &mut self.tape {
            Tape::Off => {}
            Tape::Record(r) => r.kind = kind,
            Tape::Replay(r) => r.kind = kind,
        }
    }

    /// Takes an input from outside the guest into `buf`: `produce` fills
    /// it (reads the file, asks the OS for entropy). Recorded, it is
    /// logged with its outcome; replayed, `produce` is not called and the
    /// recorded outcome is returned instead. Every input a device takes
    /// must come through here, or its replay cannot be exact.
    pub fn input(
        &mut self,
        what: &'static str,
        at: u64,
        buf: &mut [u8],
        produce: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        match &mut self.tape {
            Tape::Off => produce(buf),
            Tape::Record(r) => {
                let result = produce(buf);
                r.trace.inputs.push(External {
                    what: what.to_string(),
                    at,
                    len: buf.len() as u64,
                    data: result.as_ref().ok().map(|_| Data::capture(r.mode, buf)),
                    errno: result.as_ref().err().map(errno_of),
                });
                result
            }
            Tape::Replay(r) => {
                let i = r.next_input;
                r.next_input += 1;
                let Some(rec) = r.expected.inputs.get(i).cloned() else {
                    r.diverge(format!(
                        "the device took input {i} ({what} of {} bytes at {at:#x}); \
                         the recording has only {} inputs",
                        buf.len(),
                        r.expected.inputs.len()
                    ));
                    return Err(off_the_record());
                };
                if rec.what != what || rec.at != at || rec.len != buf.len() as u64 {
                    r.diverge(format!(
                        "input {i}: the device took {what} of {} bytes at {at:#x}; \
                         the recording has {} of {} bytes at {:#x}",
                        buf.len(),
                        rec.what,
                        rec.len,
                        rec.at
                    ));
                    return Err(off_the_record());
                }
                if let Some(errno) = rec.errno {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                match &rec.data {
                    Some(d) if d.len() == buf.len() as u64 => {
                        r.fill(d, buf);
                        Ok(())
                    }
                    _ => {
                        r.diverge(format!(
                            "input {i}: the recording holds no data of {} bytes",
                            buf.len()
                        ));
                        Err(off_the_record())
                    }
                }
            }
        }
    }

    /// Acts on the outside (writes the file, flushes it): `perform` does
    /// it. Recorded, it is logged with its data and outcome; replayed,
    /// `perform` is not called, the effect is kept for comparison and the
    /// recorded outcome returned.
    pub fn effect(
        &mut self,
        what: &'static str,
        at: u64,
        len: u64,
        data: Option<&[u8]>,
        perform: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        match &mut self.tape {
            Tape::Off => perform(),
            Tape::Record(r) => {
                let result = perform();
                r.trace.effects.push(External {
                    what: what.to_string(),
                    at,
                    len,
                    data: data.map(|d| Data::capture(r.mode, d)),
                    errno: result.as_ref().err().map(errno_of),
                });
                result
            }
            Tape::Replay(r) => {
                let i = r.next_effect;
                r.next_effect += 1;
                let errno = r.expected.effects.get(i).and_then(|e| e.errno);
                let data = data.map(|d| r.capture(d));
                r.actual.effects.push(External {
                    what: what.to_string(),
                    at,
                    len,
                    data,
                    errno,
                });
                match errno {
                    Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                    None => Ok(()),
                }
            }
        }
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
        let spans = Self::spans(&self.readable, offset, buf.len() as u64)?;
        if let Tape::Replay(r) = &mut self.tape {
            let i = r.next_read;
            r.next_read += 1;
            return match r.expected.reads.get(i).cloned() {
                Some(rec) if rec.at == offset && rec.data.len() == buf.len() as u64 => {
                    r.fill(&rec.data, buf);
                    Ok(())
                }
                rec => {
                    r.diverge(match rec {
                        Some(rec) => format!(
                            "read {i}: the device read {} bytes of guest memory at +{offset:#x}; \
                             the recording has {} bytes at +{:#x}",
                            buf.len(),
                            rec.data.len(),
                            rec.at
                        ),
                        None => format!(
                            "read {i}: the device read {} bytes of guest memory at +{offset:#x}; \
                             the recording has only {} reads",
                            buf.len(),
                            r.expected.reads.len()
                        ),
                    });
                    Err(MemoryError::NotRecorded {
                        offset,
                        len: buf.len() as u64,
                    })
                }
            };
        }
        let Some(mem) = self.mem.as_mut() else {
            return Err(MemoryError::NotRecorded {
                offset,
                len: buf.len() as u64,
            });
        };
        let mut done = 0usize;
        for (addr, n) in spans {
            mem.read(addr, &mut buf[done..done + n])?;
            done += n;
        }
        if let Tape::Record(r) = &mut self.tape {
            r.trace.reads.push(At {
                at: offset,
                data: Data::capture(r.mode, buf),
            });
        }
        Ok(())
    }

    /// Copies `buf` into the writable buffers, starting `offset` bytes in.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let spans = Self::spans(&self.writable, offset, buf.len() as u64)?;
        match &mut self.tape {
            Tape::Replay(r) => {
                let data = r.capture(buf);
                r.actual.writes.push(At { at: offset, data });
                return Ok(());
            }
            Tape::Record(r) => r.trace.writes.push(At {
                at: offset,
                data: Data::capture(r.mode, buf),
            }),
            Tape::Off => {}
        }
        let Some(mem) = self.mem.as_mut() else {
            return Err(MemoryError::NotRecorded {
                offset,
                len: buf.len() as u64,
            });
        };
        let mut done = 0usize;
        for (addr, n) in spans {
            mem.write(addr, &buf[done..done + n])?;
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

/// The `size` bytes at `offset` of a device's configuration space, as a
/// GET_CONFIG answers them: bytes past its end read as zero.
pub fn config_window(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(config.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(config.len());
    let mut out = config[start..end].to_vec();
    out.resize(size as usize, 0);
    out
}

/// How a message log describes `device` as actor `id`: how to rebuild it
/// for replay, or why it cannot be.
pub fn actor_info<D: VirtioDevice + ?Sized>(
    device: &D,
    id: &str,
) -> switchboard_runtime::recording::ActorInfo {
    let (rebuild, not_replayable) = match device.rebuild_info() {
        Ok(v) => (Some(v), None),
        Err(why) => (None, Some(why)),
    };
    switchboard_runtime::recording::ActorInfo {
        id: id.to_string(),
        kind: device.kind().to_string(),
        rebuild,
        not_replayable,
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
    /// A driver's write of `data` at `offset` of the configuration space
    /// (vhost-user SET_CONFIG). The default accepts and ignores it: no
    /// field is writable.
    fn set_config(&self, _offset: u32, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }
    /// Handles one request.
    fn handle(&self, request: Request, done: &Completer) -> Handled;
    /// Called after each batch of requests a kick brought on `queue`, on that queue's worker: a device that stages
    /// requests in `handle` hands them on here, in one go.
    fn end_batch(&self, _queue: u16) {}
    /// A request whose chain was malformed: answer what can be answered
    /// (a status byte, say). The default writes nothing.
    fn reject(&self, _queue: u16, _head: u16, _error: &ChainError) {}
    /// The status byte a request of this device type is answered with when
    /// it fails outside the device's own handling (the device panicked, the
    /// request was dropped unanswered, the device is draining): written into
    /// the request's last writable byte. `None` (the default) answers such a
    /// request with nothing written.
    fn fail_status(&self) -> Option<u8> {
        None
    }
    /// Forgets per-connection state.
    fn reset(&self) {}
    /// What replay needs to rebuild this device without its backing (the
    /// log holds it), or why it cannot be rebuilt.
    fn rebuild_info(&self) -> Result<serde_json::Value, String> {
        Err(format!("{} devices cannot be replayed", self.kind()))
    }
}
