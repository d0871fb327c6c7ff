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

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use switchboard_bus::{GuestAddr, MemRequest, MemoryError};
use switchboard_runtime::recording::{Data, DataMode, INLINE_MAX};

use switchboard_runtime::{Gate, Seq, Ticket};
pub use tape::ReplayTape;
use tape::Replaying;
pub(crate) use tape::{copy_into_spare, DecodedRequest, SeenData};

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
    /// The readable segments, then the writable ones (a chain with a
    /// readable descriptor after a writable one is refused): one vector,
    /// not two, so a request costs one allocation and stays small to move.
    segs: Vec<Segment>,
    /// Where the writable segments start in `segs`.
    split: u32,
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
    /// Set on the request a drop guard sends when it ran during a panic:
    /// the device failed with this request in its hands.
    panicked: bool,
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
            segs: std::mem::take(&mut self.segs),
            split: self.split,
            mem: self.mem.take(),
            tape: std::mem::replace(&mut self.tape, Tape::Off),
            ticket: self.ticket.take(),
            guard: None,
            fail_status: None,
            panicked: std::thread::panicking(),
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
    /// (borrowed for the names devices use, so that recording and
    /// replaying one allocates nothing).
    #[serde(deserialize_with = "what_name")]
    pub what: Cow<'static, str>,
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

/// The `what`s of the devices of this crate, in the order the binary
/// log's codec numbers them (`LOG-FORMAT.md`, codec 1).
pub(crate) const WHATS: [&str; 5] = ["file-read", "file-write", "flush", "discard", "entropy"];

/// An [`External::what`] as read back: one of [`WHATS`] borrowed, any
/// other name owned.
fn what_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Cow<'static, str>, D::Error> {
    let s: Cow<'de, str> = Deserialize::deserialize(d)?;
    Ok(match WHATS.iter().find(|w| **w == s) {
        Some(w) => Cow::Borrowed(w),
        None => Cow::Owned(s.into_owned()),
    })
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
    /// Test only ([`Until::Hash`](switchboard_runtime::recording::Until)):
    /// data longer than [`INLINE_MAX`] is hashed as recording by hash
    /// hashes it, once per block, and nothing is kept.
    HashOnly,
    /// A recording already written to the log, emptied, travelling back
    /// to the thread that pools recordings ([`Request::recycle_recording`]).
    Spent(Box<Recording>),
}

struct Recording {
    mode: DataMode,
    time: u64,
    kind: &'static str,
    trace: Trace,
    /// Byte buffers of earlier traces, for small data to be copied into.
    spare: Vec<Vec<u8>>,
}

/// Recordings kept for reuse by the thread that starts recordings (a
/// queue worker): with their buffers grown, recording a request
/// allocates nothing once the pool is warm.
const POOL_MAX: usize = 256;

thread_local! {
    // Boxed: the boxes themselves are what is reused (a recording
    // request's tape holds one).
    #[allow(clippy::vec_box)]
    static POOL: std::cell::RefCell<Vec<Box<Recording>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Recording {
    /// `bytes` as this recording records them ([`Data::capture`]), small
    /// data copied into a spare buffer instead of a new one.
    fn capture(&mut self, bytes: &[u8]) -> Data {
        if self.mode == DataMode::Value || bytes.len() <= INLINE_MAX {
            return Data::Bytes(copy_into_spare(&mut self.spare, bytes));
        }
        Data::capture(self.mode, bytes)
    }

    /// Empties the trace, keeping its buffers. Popped rather than
    /// drained: a `Drain` of each of the four lists cost more than the
    /// few entries a request holds.
    fn clear(&mut self) {
        let t = &mut self.trace;
        let spare = &mut self.spare;
        let mut keep = |d: Data| {
            if let Data::Bytes(b) = d {
                if spare.len() < 16 {
                    spare.push(b);
                }
            }
        };
        while let Some(a) = t.reads.pop() {
            keep(a.data);
        }
        while let Some(a) = t.writes.pop() {
            keep(a.data);
        }
        while let Some(e) = t.inputs.pop() {
            if let Some(d) = e.data {
                keep(d);
            }
        }
        while let Some(e) = t.effects.pop() {
            if let Some(d) = e.data {
                keep(d);
            }
        }
    }

    /// Puts this recording, already empty, into this thread's pool.
    fn pool(self: Box<Self>) {
        // A thread that is ending may have dropped its pool already.
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        });
    }
}

/// A request's recording, taken out of it ([`Request::take_recording`]):
/// its delivery time, message type and trace. Dropped, it goes back to
/// its thread's pool of recordings.
pub struct Recorded(Option<Box<Recording>>);

impl Recorded {
    /// Delivery time, ns since the recording started.
    pub fn time(&self) -> u64 {
        self.0.as_ref().map_or(0, |r| r.time)
    }

    /// The message type the device gave it.
    pub fn kind(&self) -> &'static str {
        self.0.as_ref().map_or("request", |r| r.kind)
    }

    /// What the handler exchanged with the world.
    pub fn trace(&self) -> &Trace {
        const EMPTY: &Trace = &Trace {
            reads: Vec::new(),
            inputs: Vec::new(),
            writes: Vec::new(),
            effects: Vec::new(),
        };
        self.0.as_ref().map_or(EMPTY, |r| &r.trace)
    }

    /// The trace, owned (the rest goes back to the pool).
    pub fn into_trace(mut self) -> Trace {
        self.0
            .as_mut()
            .map(|r| std::mem::take(&mut r.trace))
            .unwrap_or_default()
    }
}

impl fmt::Debug for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorded")
            .field("time", &self.time())
            .field("kind", &self.kind())
            .field("trace", self.trace())
            .finish()
    }
}

impl AsRef<Trace> for Recorded {
    fn as_ref(&self) -> &Trace {
        self.trace()
    }
}

impl AsRef<Trace> for Trace {
    fn as_ref(&self) -> &Trace {
        self
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let Some(mut r) = self.0.take() else { return };
        r.clear();
        r.pool();
    }
}

/// Hashes `bytes` as a recording by hash would (only data longer than
/// [`INLINE_MAX`]; shorter is copied), and forgets the hash
/// ([`Tape::HashOnly`]).
fn hash_only(bytes: &[u8]) {
    if bytes.len() > INLINE_MAX {
        std::hint::black_box(switchboard_runtime::recording::hash(bytes));
    }
}

/// A `reuse` for [`Tape::HashOnly`]: the bytes were hashed already.
const HASHED: Option<Data> = Some(Data::Hash { len: 0, hash: 0 });

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
            .field("readable", &self.readable())
            .field("writable", &self.writable())
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
        let mut segs = Vec::new();
        let mut split = 0u32;
        let mut any_writable = false;
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
            if !write_only && any_writable {
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
                any_writable = true;
                segs.push(seg);
            } else {
                split += 1;
                segs.push(seg);
            }
        }
        Ok(Request {
            queue,
            head,
            segs,
            split,
            mem: Some(mem),
            tape: Tape::Off,
            ticket: None,
            guard: None,
            fail_status: None,
            panicked: false,
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

    /// Whether this is what a drop guard sent for a request dropped during
    /// a panic (the device failed while handling it): with in-flight
    /// tracking the server leaves such a request for resubmission.
    pub fn dropped_in_panic(&self) -> bool {
        self.panicked
    }

    /// The gate that admitted it, if it was admitted: a thread that runs
    /// the request elsewhere (an I/O thread) fails the device through it
    /// when it catches a panic.
    pub fn gate(&self) -> Option<&Gate> {
        self.ticket.as_ref().map(Ticket::gate)
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
        let mut tape = ReplayTape::new(mode);
        *tape.expected_mut() = expected;
        Self::replay_on(queue, head, readable, writable, tape)
    }

    /// [`Request::replay`] on a reused tape: the recording is the tape's
    /// [`ReplayTape::expected_mut`], and [`Request::take_tape`] gives the
    /// tape back, holding what the request did. Allocates nothing once the
    /// tape's buffers have grown.
    pub fn replay_on(
        queue: u16,
        head: u16,
        readable: &[u32],
        writable: &[u32],
        mut tape: ReplayTape,
    ) -> Self {
        tape.rewind();
        let mut segs = std::mem::take(&mut tape.segs);
        segs.clear();
        segs.extend(readable.iter().chain(writable).map(|&len| Segment {
            addr: GuestAddr(0),
            len,
        }));
        Request {
            queue,
            head,
            segs,
            split: readable.len() as u32,
            mem: None,
            ticket: None,
            guard: None,
            fail_status: None,
            panicked: false,
            tape: Tape::Replay(tape.r),
        }
    }

    /// The tape of a replayed request ([`Request::replay_on`]), holding
    /// what it did; `None` for a live request.
    pub fn take_tape(&mut self) -> Option<ReplayTape> {
        match std::mem::replace(&mut self.tape, Tape::Off) {
            Tape::Replay(r) => Some(ReplayTape {
                r,
                segs: std::mem::take(&mut self.segs),
            }),
            other => {
                self.tape = other;
                None
            }
        }
    }

    /// Test only: hashes the data this request moves as recording by hash
    /// would, and records nothing ([`Until::Hash`](switchboard_runtime::recording::Until)).
    pub fn hash_only(&mut self) {
        self.tape = Tape::HashOnly;
    }

    /// Starts recording what the handler does with this request; `time`
    /// is its delivery time.
    pub fn record(&mut self, mode: DataMode, time: u64) {
        let pooled = POOL.try_with(|p| p.borrow_mut().pop()).ok().flatten();
        let recording = match pooled {
            Some(mut r) => {
                r.mode = mode;
                r.time = time;
                r.kind = "request";
                r
            }
            None => Box::new(Recording {
                mode,
                time,
                kind: "request",
                trace: Trace::default(),
                spare: Vec::new(),
            }),
        };
        self.tape = Tape::Record(recording);
    }

    /// The recording made since [`Request::record`]: delivery time, type
    /// and trace. It goes back to this thread's pool when dropped, or
    /// with the request to the thread that started it
    /// ([`Request::spend_recording`]).
    pub fn take_recording(&mut self) -> Option<Recorded> {
        match std::mem::replace(&mut self.tape, Tape::Off) {
            Tape::Record(r) => Some(Recorded(Some(r))),
            other => {
                self.tape = other;
                None
            }
        }
    }

    /// Gives a recording that was written to the log back to the request,
    /// emptied, so that it returns to the pool of the thread that calls
    /// [`Request::recycle_recording`] (the queue worker, which starts
    /// recordings) instead of the pool of this one. The request records
    /// nothing more.
    pub fn spend_recording(&mut self, mut recorded: Recorded) {
        if let Some(mut r) = recorded.0.take() {
            r.clear();
            self.tape = Tape::Spent(r);
        }
    }

    /// Puts a spent recording ([`Request::spend_recording`]) into this
    /// thread's pool.
    pub fn recycle_recording(&mut self) {
        if let Tape::Spent(r) = std::mem::replace(&mut self.tape, Tape::Off) {
            r.pool();
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
            Tape::Off | Tape::Spent(_) | Tape::HashOnly => {}
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
            Tape::Off | Tape::Spent(_) => produce(buf),
            Tape::HashOnly => {
                let result = produce(buf);
                if result.is_ok() {
                    hash_only(buf);
                }
                result
            }
            Tape::Record(r) => {
                let result = produce(buf);
                let data = result.as_ref().ok().map(|_| r.capture(buf));
                r.trace.inputs.push(External {
                    what: Cow::Borrowed(what),
                    at,
                    len: buf.len() as u64,
                    data,
                    errno: result.as_ref().err().map(errno_of),
                });
                result
            }
            Tape::Replay(r) => {
                let i = r.next_input;
                r.next_input += 1;
                let Some(rec) = r.expected.inputs.get(i) else {
                    let n = r.expected.inputs.len();
                    r.diverge(format!(
                        "the device took input {i} ({what} of {} bytes at {at:#x}); \
                         the recording has only {n} inputs",
                        buf.len(),
                    ));
                    return Err(off_the_record());
                };
                if rec.what != what || rec.at != at || rec.len != buf.len() as u64 {
                    let why = format!(
                        "input {i}: the device took {what} of {} bytes at {at:#x}; \
                         the recording has {} of {} bytes at {:#x}",
                        buf.len(),
                        rec.what,
                        rec.len,
                        rec.at
                    );
                    r.diverge(why);
                    return Err(off_the_record());
                }
                if let Some(errno) = rec.errno {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                match &rec.data {
                    Some(d) if d.len() == buf.len() as u64 => {
                        Replaying::fill(&mut r.fills, d, buf);
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
        self.effect_with(what, at, len, data, None, perform)
    }

    /// Reads `buf.len()` readable bytes at `offset` into `buf`, then acts
    /// on the outside with exactly those bytes: [`Request::read_at`] then
    /// [`Request::effect`] with `Some(buf)`, the bytes captured once when
    /// recorded (a disk write's block is hashed once, not twice).
    pub fn read_into_effect(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        what: &'static str,
        at: u64,
        perform: impl FnOnce(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.read_at(offset, buf).map_err(io::Error::other)?;
        let reuse = match &self.tape {
            Tape::Record(r) => r.trace.reads.last().map(|a| a.data.clone()),
            Tape::HashOnly => HASHED,
            _ => None,
        };
        let data: &[u8] = buf;
        self.effect_with(what, at, data.len() as u64, Some(data), reuse, || {
            perform(data)
        })
    }

    /// Takes an input into `buf`, then writes exactly those bytes to the
    /// writable buffers at `offset`: [`Request::input`] then
    /// [`Request::write_at`], the bytes captured once when recorded (a disk
    /// read's block is hashed once, not twice).
    pub fn input_into_guest(
        &mut self,
        what: &'static str,
        at: u64,
        buf: &mut [u8],
        offset: u64,
        produce: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.input(what, at, buf, produce)?;
        let reuse = match &self.tape {
            Tape::Record(r) => r.trace.inputs.last().and_then(|e| e.data.clone()),
            Tape::HashOnly => HASHED,
            _ => None,
        };
        self.write_at_with(offset, buf, reuse)
            .map_err(io::Error::other)
    }

    /// [`Request::effect`], with the data already captured when `reuse`
    /// is given (recording only).
    fn effect_with(
        &mut self,
        what: &'static str,
        at: u64,
        len: u64,
        data: Option<&[u8]>,
        reuse: Option<Data>,
        perform: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        match &mut self.tape {
            Tape::Off | Tape::Spent(_) => perform(),
            Tape::HashOnly => {
                if let (Some(d), None) = (data, &reuse) {
                    hash_only(d);
                }
                perform()
            }
            Tape::Record(r) => {
                let result = perform();
                let data = match reuse {
                    Some(d) => Some(d),
                    None => data.map(|d| r.capture(d)),
                };
                r.trace.effects.push(External {
                    what: Cow::Borrowed(what),
                    at,
                    len,
                    data,
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
                    what: Cow::Borrowed(what),
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
        &self.segs[..self.split as usize]
    }

    /// The device-writable buffers, in order.
    pub fn writable(&self) -> &[Segment] {
        &self.segs[self.split as usize..]
    }

    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable().iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable().iter().map(|s| u64::from(s.len)).sum()
    }

    /// Copies readable bytes starting `offset` bytes into the readable
    /// buffers into `buf`. Fails if they are fewer than `buf.len()`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if let Tape::Replay(r) = &mut self.tape {
            Self::check_span(&self.segs[..self.split as usize], offset, buf.len() as u64)?;
            let i = r.next_read;
            r.next_read += 1;
            return match r.expected.reads.get(i) {
                Some(rec) if rec.at == offset && rec.data.len() == buf.len() as u64 => {
                    Replaying::fill(&mut r.fills, &rec.data, buf);
                    Ok(())
                }
                rec => {
                    let why = match rec {
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
                    };
                    r.diverge(why);
                    Err(MemoryError::NotRecorded {
                        offset,
                        len: buf.len() as u64,
                    })
                }
            };
        }
        let spans = Self::spans(self.readable(), offset, buf.len() as u64)?;
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
        match &mut self.tape {
            Tape::Record(r) => {
                let data = r.capture(buf);
                r.trace.reads.push(At { at: offset, data });
            }
            Tape::HashOnly => hash_only(buf),
            _ => {}
        }
        Ok(())
    }

    /// Copies `buf` into the writable buffers, starting `offset` bytes in.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.write_at_with(offset, buf, None)
    }

    /// [`Request::write_at`], with `buf` already captured when `reuse` is
    /// given (recording only).
    fn write_at_with(
        &mut self,
        offset: u64,
        buf: &[u8],
        reuse: Option<Data>,
    ) -> Result<(), MemoryError> {
        if let Tape::Replay(r) = &mut self.tape {
            Self::check_span(&self.segs[self.split as usize..], offset, buf.len() as u64)?;
            let data = r.capture(buf);
            r.actual.writes.push(At { at: offset, data });
            return Ok(());
        }
        let spans = Self::spans(self.writable(), offset, buf.len() as u64)?;
        match &mut self.tape {
            Tape::Record(r) => {
                let data = match reuse {
                    Some(d) => d,
                    None => r.capture(buf),
                };
                r.trace.writes.push(At { at: offset, data });
            }
            Tape::HashOnly if reuse.is_none() => hash_only(buf),
            _ => {}
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

    /// Whether `segs` cover `[offset, offset+len)`: what
    /// [`Request::spans`] checks, without building the pieces.
    fn check_span(segs: &[Segment], offset: u64, len: u64) -> Result<(), MemoryError> {
        let size: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
        if len > 0 && offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(MemoryError::OutOfRegion { offset, len, size });
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
/// - Every request `handle` gets was admitted by the device's gate and
///   carries its ticket: the device answers it exactly once (returning it in
///   [`Handled::Done`] or through the [`Completer`]); a request it drops is
///   answered by the request's drop guard with [`VirtioDevice::fail_status`].
/// - A panic in any of these methods, or on a thread of the device's that
///   catches it and fails the request's [`Gate`], fails this device alone.
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

#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
mod tape;

#[cfg(test)]
mod tests {
    use switchboard_bus::MemoryError;
    use switchboard_runtime::{Gate, MessageKind, Seq};

    use super::mock::{
        Completions, Desc, MockDriver, MockGuest, DATA_BASE, HIGH_RAM_BASE, RAM_BASE, RAM_SIZE,
    };
    use super::*;

    const A: u64 = DATA_BASE;
    const B: u64 = DATA_BASE + 0x1000;
    const C: u64 = DATA_BASE + 0x2000;
    const D: u64 = DATA_BASE + 0x3000;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddr(addr),
            len,
        }
    }

    fn bytes(n: usize, first: u8) -> Vec<u8> {
        (0..n).map(|i| first.wrapping_add(i as u8)).collect()
    }

    /// A request admitted on lane 0 of `gate` as message `seq`, with its
    /// drop guard armed.
    fn admit(
        request: &mut Request,
        gate: &Gate,
        seq: u64,
        done: &Completions,
        fail_status: Option<u8>,
    ) {
        let ticket = gate
            .admit(0, Seq(seq), MessageKind::Request)
            .expect("a running gate admits");
        request.admitted(ticket, done.completer(), fail_status);
    }

    #[test]
    fn test_request_stays_small_enough_to_move_without_a_memcpy_call() {
        // A request is moved several times on its way (into the device, into
        // the I/O pool, through the completion channel). Past 128 bytes the
        // compiler moves it with a call to memcpy: about 30 instructions per
        // move, 400 per request as measured with callgrind.
        assert!(
            std::mem::size_of::<Request>() <= 128,
            "Request is {} bytes",
            std::mem::size_of::<Request>()
        );
    }

    #[test]
    fn test_chain_splits_into_readable_then_writable_segments() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 3);
        driver.add_chain(&[Desc::r(A, 16)]);
        let head = driver.add_chain(&[
            Desc::r(B, 16),
            Desc::r(C, 512),
            Desc::w(D, 512),
            Desc::w(HIGH_RAM_BASE, 1),
        ]);
        let mut walked = driver.walk();
        assert_eq!(walked.len(), 2);
        let w = walked.remove(1);
        assert_eq!(w.head, head);
        assert_eq!(head, 1);
        let r = w.request.expect("well formed");
        assert_eq!(r.queue(), 3);
        assert_eq!(r.head(), 1);
        assert_eq!(r.readable(), &[seg(B, 16), seg(C, 512)]);
        assert_eq!(r.writable(), &[seg(D, 512), seg(HIGH_RAM_BASE, 1)]);
        assert_eq!(r.readable_len(), 528);
        assert_eq!(r.writable_len(), 513);
    }

    #[test]
    fn test_indirect_chain_is_walked_like_a_direct_one() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        driver.add_chain(&[Desc::r(A, 8)]);
        let head = driver.add_indirect_chain(&[Desc::r(B, 16), Desc::w(C, 64), Desc::w(D, 1)]);
        let mut walked = driver.walk();
        assert_eq!(walked.len(), 2);
        let w = walked.remove(1);
        assert_eq!(w.head, head);
        assert_eq!(
            w.descriptors,
            vec![
                (GuestAddr(B), 16, false),
                (GuestAddr(C), 64, true),
                (GuestAddr(D), 1, true)
            ]
        );
        let r = w.request.expect("well formed");
        assert_eq!(r.head(), head);
        assert_eq!(r.readable(), &[seg(B, 16)]);
        assert_eq!(r.writable(), &[seg(C, 64), seg(D, 1)]);
    }

    #[test]
    fn test_readable_after_writable_is_rejected() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        driver.add_chain(&[Desc::r(A, 1)]);
        let head = driver.add_chain(&[Desc::r(A, 16), Desc::w(B, 1), Desc::r(C, 16)]);
        let w = driver.walk().remove(1);
        match w.request {
            Err(ChainError::ReadableAfterWritable { head: h }) => assert_eq!(h, head),
            other => panic!("expected ReadableAfterWritable, got {other:?}"),
        }
        // The leases taken for the first buffers went with the error.
        assert_eq!(guest.leases(), vec![0, 0]);
    }

    #[test]
    fn test_chain_longer_than_the_limit_is_rejected() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let limit = u32::try_from(MAX_CHAIN_BYTES).expect("64 MiB fits");
        let head = driver.add_chain(&[Desc::r(A, 16), Desc::w(B, limit)]);
        match driver.walk().remove(0).request {
            Err(ChainError::TooLong {
                head: h,
                len,
                limit,
            }) => {
                assert_eq!(h, head);
                assert_eq!(len, MAX_CHAIN_BYTES + 16);
                assert_eq!(limit, MAX_CHAIN_BYTES);
            }
            other => panic!("expected TooLong, got {other:?}"),
        }
    }

    #[test]
    fn test_chain_of_exactly_the_limit_is_not_too_long() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let limit = u32::try_from(MAX_CHAIN_BYTES).expect("64 MiB fits");
        driver.add_chain(&[Desc::w(A, limit)]);
        // Not refused for its length; its buffer runs past the 1 MiB of RAM.
        match driver.walk().remove(0).request {
            Err(ChainError::Memory { len, .. }) => assert_eq!(len, limit),
            other => panic!("expected a memory error, got {other:?}"),
        }
    }

    #[test]
    fn test_buffer_running_out_of_ram_is_rejected() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let end = RAM_BASE + RAM_SIZE;
        let head = driver.add_chain(&[Desc::r(A, 16), Desc::w(end - 8, 16)]);
        match driver.walk().remove(0).request {
            Err(ChainError::Memory {
                head: h,
                addr,
                len,
                source: MemoryError::Unmapped { .. },
            }) => {
                assert_eq!(h, head);
                assert_eq!(addr, GuestAddr(end - 8));
                assert_eq!(len, 16);
            }
            other => panic!("expected an unmapped buffer, got {other:?}"),
        }
        assert_eq!(guest.leases(), vec![0, 0]);
    }

    #[test]
    fn test_buffer_in_the_hole_between_ram_regions_is_rejected() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let hole = RAM_BASE + RAM_SIZE + 0x1000;
        driver.add_chain(&[Desc::r(hole, 1)]);
        assert!(matches!(
            driver.walk().remove(0).request,
            Err(ChainError::Memory {
                addr: GuestAddr(a),
                source: MemoryError::Unmapped { .. },
                ..
            }) if a == hole
        ));
    }

    #[test]
    fn test_request_leases_each_region_it_touches_until_dropped() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        driver.add_chain(&[Desc::r(A, 16), Desc::r(B, 16), Desc::w(HIGH_RAM_BASE, 1)]);
        let request = driver.walk_one();
        // One lease per region, however many buffers are in it.
        assert_eq!(guest.leases(), vec![1, 1]);
        drop(request);
        assert_eq!(guest.leases(), vec![0, 0]);
    }

    #[test]
    fn test_read_at_gathers_across_readable_segments() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        guest.write(A, &bytes(4, 0x10));
        guest.write(B, &bytes(8, 0x20));
        driver.add_chain(&[Desc::r(A, 4), Desc::r(B, 8), Desc::w(C, 1)]);
        let mut r = driver.walk_one();
        let mut buf = [0u8; 6];
        r.read_at(2, &mut buf).expect("inside the readable bytes");
        assert_eq!(buf, [0x12, 0x13, 0x20, 0x21, 0x22, 0x23]);
    }

    #[test]
    fn test_write_at_scatters_across_writable_segments() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        guest.fill(B, 4, 0xee);
        guest.fill(HIGH_RAM_BASE, 4, 0xee);
        driver.add_chain(&[Desc::r(A, 16), Desc::w(B, 4), Desc::w(HIGH_RAM_BASE, 4)]);
        let mut r = driver.walk_one();
        r.write_at(2, &[1, 2, 3, 4])
            .expect("inside the writable bytes");
        assert_eq!(guest.read(B, 4), [0xee, 0xee, 1, 2]);
        assert_eq!(guest.read(HIGH_RAM_BASE, 4), [3, 4, 0xee, 0xee]);
        // The readable buffer is not writable.
        assert_eq!(guest.read(A, 4), [0, 0, 0, 0]);
    }

    /// The trace `pass` records on a fresh request over a 16-byte
    /// readable and a 200-byte writable buffer holding `fill`.
    fn recorded(mode: DataMode, fill: u8, pass: impl FnOnce(&mut Request)) -> Recorded {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        guest.fill(A, 16, fill);
        driver.add_chain(&[Desc::r(A, 16), Desc::w(B, 200)]);
        let mut r = driver.walk_one();
        r.record(mode, 7);
        pass(&mut r);
        let recorded = r.take_recording().expect("recorded");
        assert_eq!(recorded.time(), 7);
        recorded
    }

    fn trace_of(mode: DataMode, fill: u8, pass: impl FnOnce(&mut Request)) -> Trace {
        recorded(mode, fill, pass).into_trace()
    }

    #[test]
    fn test_pass_through_records_what_the_two_calls_record() {
        // input_into_guest and read_into_effect hash a block once; the
        // trace must still be what input + write_at and read_at + effect
        // record, in both data modes, short or long.
        for mode in [DataMode::Hash, DataMode::Value] {
            for len in [8usize, 200] {
                let data = bytes(len, 3);
                let produce = |b: &mut [u8]| {
                    b.copy_from_slice(&data);
                    Ok(())
                };
                let joined = trace_of(mode, 0, |r| {
                    let mut buf = vec![0; len];
                    r.input_into_guest("file-read", 512, &mut buf, 0, produce)
                        .expect("input");
                });
                let apart = trace_of(mode, 0, |r| {
                    let mut buf = vec![0; len];
                    r.input("file-read", 512, &mut buf, produce).expect("input");
                    r.write_at(0, &buf).expect("write");
                });
                assert_eq!(joined, apart, "{mode:?}, {len} bytes in");
                assert_eq!(joined.writes.len(), 1);
                assert!(joined.writes[0].data.same(&Data::Bytes(data.clone())));

                let n = len.min(16);
                let joined = trace_of(mode, 9, |r| {
                    let mut buf = vec![0; n];
                    r.read_into_effect(0, &mut buf, "file-write", 1024, |b| {
                        assert_eq!(b, vec![9; n].as_slice());
                        Ok(())
                    })
                    .expect("effect");
                });
                let apart = trace_of(mode, 9, |r| {
                    let mut buf = vec![0; n];
                    r.read_at(0, &mut buf).expect("read");
                    r.effect("file-write", 1024, n as u64, Some(&buf), || Ok(()))
                        .expect("effect");
                });
                assert_eq!(joined, apart, "{mode:?}, {n} bytes out");
                assert_eq!(
                    joined.effects[0].data,
                    Some(Data::capture(mode, &vec![9; n]))
                );
            }
        }
    }

    #[test]
    fn test_a_hash_only_request_moves_its_data_and_leaves_no_recording() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        guest.fill(A, 16, 4);
        driver.add_chain(&[Desc::r(A, 16), Desc::w(B, 200)]);
        let mut r = driver.walk_one();
        r.hash_only();
        let mut header = [0u8; 16];
        r.read_at(0, &mut header).expect("read");
        assert_eq!(header, [4; 16]);
        let mut block = vec![0u8; 150];
        r.input_into_guest("file-read", 0, &mut block, 0, |b| {
            b.fill(7);
            Ok(())
        })
        .expect("input");
        r.write_at(150, &[0]).expect("status");
        r.effect("flush", 0, 0, None, || Ok(())).expect("effect");
        assert!(r.take_recording().is_none());
        assert_eq!(guest.read(B, 151), [&[7u8; 150][..], &[0]].concat());
    }

    #[test]
    fn test_a_reused_recording_starts_empty() {
        // Recordings go back to the thread's pool when dropped; the next
        // request recorded on this thread must not see the last one's
        // entries, whatever they held.
        for _ in 0..3 {
            let first = recorded(DataMode::Value, 1, |r| {
                let mut buf = [0u8; 16];
                r.read_at(0, &mut buf).expect("read");
                r.write_at(0, &[5; 100]).expect("write");
            });
            assert_eq!(
                (first.trace().reads.len(), first.trace().writes.len()),
                (1, 1)
            );
            // Dropped whole: back to the pool with its entries cleared.
            drop(first);
            let next = recorded(DataMode::Hash, 2, |r| {
                r.write_at(0, &[1]).expect("write");
            });
            assert_eq!(next.trace().reads, vec![]);
            assert_eq!(
                next.trace().writes,
                vec![At {
                    at: 0,
                    data: Data::Bytes(vec![1])
                }]
            );
            assert_eq!(next.kind(), "request");
        }
    }

    #[test]
    fn test_read_at_past_the_readable_bytes_fails() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        driver.add_chain(&[Desc::r(A, 4), Desc::r(B, 4), Desc::w(C, 64)]);
        let mut r = driver.walk_one();
        let mut buf = [0u8; 4];
        // The writable bytes beyond do not count.
        assert!(matches!(
            r.read_at(6, &mut buf),
            Err(MemoryError::OutOfRegion {
                offset: 6,
                len: 4,
                size: 8
            })
        ));
    }

    #[test]
    fn test_write_at_past_the_writable_bytes_fails_and_writes_nothing() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        guest.fill(B, 4, 0xee);
        driver.add_chain(&[Desc::r(A, 16), Desc::w(B, 4)]);
        let mut r = driver.walk_one();
        assert!(matches!(
            r.write_at(2, &[1, 2, 3]),
            Err(MemoryError::OutOfRegion { size: 4, .. })
        ));
        assert_eq!(guest.read(B, 4), [0xee; 4]);
    }

    #[test]
    fn test_unanswered_request_answers_itself_once_with_the_failure_status() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let gate = Gate::running("t", 1, 8);
        let done = Completions::new();
        guest.fill(B, 512, 0xee);
        guest.fill(C, 1, 0xee);
        let head = driver.add_chain(&[Desc::r(A, 16), Desc::w(B, 512), Desc::w(C, 1)]);
        let mut r = driver.walk_one();
        admit(&mut r, &gate, 1, &done, Some(0xa5));
        assert_eq!(gate.in_flight(), 1);
        drop(r);
        let mut answers = done.drain();
        assert_eq!(answers.len(), 1, "answered exactly once");
        let (orphan, len) = answers.remove(0);
        assert_eq!(len, 1);
        assert_eq!(orphan.head(), head);
        // The status went into the last writable byte, nothing else.
        assert_eq!(guest.read(C, 1), [0xa5]);
        assert_eq!(guest.read(B, 512), vec![0xee; 512]);
        // The answer still holds the admission until its used entry is written.
        assert_eq!(gate.in_flight(), 1);
        assert_eq!(orphan.seq(), Some(Seq(1)));
        driver.finish(orphan, len);
        assert_eq!(gate.in_flight(), 0);
        assert_eq!(driver.used(), vec![(u32::from(head), 1)]);
        assert!(done.drain().is_empty(), "the answer does not answer again");
        assert_eq!(guest.leases(), vec![0, 0]);
    }

    #[test]
    fn test_unanswered_request_without_failure_status_answers_with_nothing_written() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let gate = Gate::running("t", 1, 8);
        let done = Completions::new();
        guest.fill(B, 8, 0xee);
        driver.add_chain(&[Desc::w(B, 8)]);
        let mut r = driver.walk_one();
        admit(&mut r, &gate, 1, &done, None);
        drop(r);
        let (orphan, len) = done.next();
        assert_eq!(len, 0);
        assert_eq!(guest.read(B, 8), vec![0xee; 8]);
        driver.finish(orphan, len);
        assert_eq!(gate.in_flight(), 0);
        assert!(done.drain().is_empty());
    }

    #[test]
    fn test_unanswered_request_without_writable_bytes_answers_with_length_zero() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let gate = Gate::running("t", 1, 8);
        let done = Completions::new();
        guest.fill(A, 16, 0xee);
        driver.add_chain(&[Desc::r(A, 16)]);
        let mut r = driver.walk_one();
        admit(&mut r, &gate, 1, &done, Some(1));
        drop(r);
        let (orphan, len) = done.next();
        assert_eq!(len, 0);
        // A readable buffer is never written, not even for the status.
        assert_eq!(guest.read(A, 16), vec![0xee; 16]);
        driver.finish(orphan, len);
        assert_eq!(gate.in_flight(), 0);
    }

    #[test]
    fn test_ticket_is_held_until_answered() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let gate = Gate::running("t", 1, 8);
        let done = Completions::new();
        driver.add_chain(&[Desc::r(A, 16), Desc::w(B, 1)]);
        let mut r = driver.walk_one();
        assert_eq!(r.seq(), None);
        assert!(r.gate().is_none());
        admit(&mut r, &gate, 7, &done, Some(1));
        assert_eq!(r.seq(), Some(Seq(7)));
        assert_eq!(r.gate().map(|g| g.name().to_string()), Some("t".into()));
        assert_eq!(gate.in_flight(), 1);
        let ticket = r.answered().expect("the admission");
        assert_eq!(ticket.seq(), Seq(7));
        assert_eq!(r.seq(), None);
        // Answered: dropping the request neither answers it again nor ends
        // the admission, which the ticket's holder ends.
        drop(r);
        assert!(done.drain().is_empty());
        assert_eq!(gate.in_flight(), 1);
        drop(ticket);
        assert_eq!(gate.in_flight(), 0);
    }

    #[test]
    fn test_request_not_admitted_is_dropped_silently() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let done = Completions::new();
        driver.add_chain(&[Desc::w(B, 1)]);
        let r = driver.walk_one();
        drop(r);
        assert!(done.drain().is_empty());
        assert_eq!(guest.read(B, 1), [0]);
    }

    #[test]
    fn test_queue_walk_takes_each_offered_chain_once_in_order() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let heads = [
            driver.add_chain(&[Desc::r(A, 16), Desc::w(B, 1)]),
            driver.add_indirect_chain(&[Desc::r(C, 16), Desc::w(D, 1)]),
            driver.add_chain(&[Desc::w(D + 0x100, 4)]),
        ];
        assert_eq!(heads, [0, 2, 3]);
        let walked = driver.walk();
        assert_eq!(
            walked.iter().map(|w| w.head).collect::<Vec<_>>(),
            heads.to_vec()
        );
        for (i, w) in walked.into_iter().enumerate() {
            driver.finish(w.request.expect("well formed"), i as u32 + 10);
        }
        assert_eq!(driver.used(), vec![(0, 10), (2, 11), (3, 12)]);
        assert!(driver.walk().is_empty(), "nothing offered since");
        let late = driver.add_chain(&[Desc::w(A, 1)]);
        assert_eq!(
            driver.walk().iter().map(|w| w.head).collect::<Vec<_>>(),
            vec![late]
        );
    }

    #[test]
    fn test_config_window_pads_past_the_end_with_zeroes() {
        assert_eq!(config_window(&[1, 2, 3, 4], 2, 4), vec![3, 4, 0, 0]);
        assert_eq!(config_window(&[1, 2], 8, 2), vec![0, 0]);
        assert_eq!(
            config_window(&[1, 2], u32::MAX, u32::MAX >> 28),
            vec![0; 15]
        );
    }
}
