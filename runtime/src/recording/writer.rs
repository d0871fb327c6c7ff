// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The recorder's buffers and its writer thread.
//!
//! Each thread that records has a [`Slot`] of its own per recorder: a byte
//! buffer behind a mutex that only that thread and the writer take. A
//! record takes its `seq` from the shared counter *inside* its slot's
//! mutex and is encoded there, in the slot form below; the writer swaps
//! every slot's buffer for an emptied one it took from that slot before,
//! and since it read the counter
//! first, every seq below what it read is in a buffer it holds. It merges
//! the slots in seq order up to there (by seq: those not yet written are
//! dense, [`merge_by_index`]) and writes the log (JSON Lines or binary
//! frames: `LOG-FORMAT.md`).
//!
//! Slot form of one record (native-endian, never on disk):
//! `len:u32 seq:u64 time:u64 latency:u64 names:u8 [from:u16+bytes
//! to:u16+bytes type:u16+bytes] codec:u8 body_len:u32 body cuts_len:u32 cuts values`,
//! where the names are given (`names` 0) or are the slot's last record's
//! (1, binary only: the writer keeps each slot's last name indices), a
//! [`CODEC_JSON`] body is `payload_len:u32 payload reply` (and
//! has no cuts or values), and a binary body is its fixed bytes, with the
//! cuts and values its codec wrote through [`Spans`]: already split, so
//! that the writer compares the fixed bytes and cuts with the last
//! record's and copies the values into the record frame.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::binary::CODEC_JSON;
use super::shape::{FrameEncoder, Names, RecordParts, Spans};
use super::{Body, LogFormat, RecordKind, Summary, WhenFull};

/// **Test only**: how far a record given to [`Recorder::record_body`](super::Recorder::record_body)
/// goes, to measure what each stage of recording costs (`serve
/// --test-record-until`, `integration/qemu/record-stages.sh`). Anything but
/// [`Until::Whole`] leaves a log without those records: not a recording
/// of the run, and not for replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Until {
    /// Written to the log: recording as it is.
    #[default]
    Whole,
    /// Dropped as it reaches the recorder: the source built it (a virtio
    /// request's trace, its data hashed or copied) and nothing more.
    Capture,
    /// Not even built: a virtio request's source hashes the data it moves
    /// (as recording by hash does, once per block) and builds no trace and
    /// no record; any other record is dropped as it reaches the recorder.
    /// What hashing alone costs.
    Hash,
    /// Encoded (its body, in the log's form) into a buffer of the
    /// recording thread's own, then dropped: no seq, no slot, no writer.
    Encode,
    /// Put in the recording thread's slot with its seq, as a record to
    /// write; the writer takes the slots' buffers and walks their records,
    /// but writes none.
    Slot,
}

/// One thread's buffer.
pub(super) struct Slot {
    buf: Mutex<SlotBuf>,
    /// Set when the recording ends: the thread's cache forgets the slot.
    closed: AtomicBool,
}

#[derive(Default)]
struct SlotBuf {
    bytes: Vec<u8>,
    /// The values of the record being encoded (reused).
    spans: Spans,
    records: usize,
    /// Records dropped (gap mode) and not yet announced.
    dropped: u64,
    /// The names of the last record put in this slot (its buffers
    /// reused), for a binary record with the same to say so in one byte.
    names: Option<[String; 3]>,
}

/// What the sources and the writer share.
pub(super) struct Shared {
    /// Identifies the recorder in the threads' slot caches.
    id: u64,
    /// The next seq to give; seqs are taken under a slot's mutex.
    next: AtomicU64,
    /// Every slot, for the writer. Taken by a thread the first time it
    /// records, and by the writer once per round.
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Records a slot holds before it is full.
    limit: usize,
    when_full: WhenFull,
    compress: super::Compress,
    /// [`Until::Slot`](super::Until::Slot): the writer drops the records
    /// it takes instead of writing them.
    drop_taken: bool,
    /// Set by `finish`: later records are not written.
    pub(super) ended: AtomicBool,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's slot of each recorder it records to.
    static SLOTS: RefCell<Vec<(u64, Arc<Slot>)>> = const { RefCell::new(Vec::new()) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every holder leaves the buffer whole (appends are of complete
    // records), so a poisoned lock's data is still good.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(super) fn new(
        limit: usize,
        when_full: WhenFull,
        compress: super::Compress,
        drop_taken: bool,
    ) -> Self {
        Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            next: AtomicU64::new(1),
            slots: Mutex::default(),
            limit: limit.max(1),
            when_full,
            compress,
            drop_taken,
            ended: AtomicBool::new(false),
        }
    }

    /// Runs `f` with this thread's slot, made the first time.
    fn with_slot<R>(&self, f: impl FnOnce(&Slot) -> R) -> R {
        SLOTS.with(|cache| {
            if let Some((_, slot)) = cache.borrow().iter().find(|(id, _)| *id == self.id) {
                return f(slot);
            }
            let slot = Arc::new(Slot {
                buf: Mutex::default(),
                closed: AtomicBool::new(false),
            });
            lock(&self.slots).push(Arc::clone(&slot));
            let mut cache = cache.borrow_mut();
            cache.retain(|(_, s)| !s.closed.load(Ordering::Relaxed));
            cache.push((self.id, Arc::clone(&slot)));
            drop(cache);
            f(&slot)
        })
    }

    /// Encodes one record into this thread's slot; waits or drops it
    /// (counted) when the slot is full.
    pub(super) fn record(
        &self,
        format: LogFormat,
        time: u64,
        latency: u64,
        names: [&str; 3],
        body: &dyn Body,
    ) {
        self.with_slot(|slot| loop {
            if self.ended.load(Ordering::Acquire) {
                return;
            }
            let mut b = lock(&slot.buf);
            // Full at its record limit, or at `BUFFER_BYTES` (by value, a
            // record is a whole block); a record alone may be larger.
            if b.records >= self.limit || b.bytes.len() >= super::BUFFER_BYTES {
                match self.when_full {
                    WhenFull::Wait => {
                        drop(b);
                        thread::sleep(Duration::from_micros(50));
                        continue;
                    }
                    WhenFull::Gap => {
                        b.dropped += 1;
                        return;
                    }
                }
            }
            let b = &mut *b;
            if b.dropped > 0 {
                let n = std::mem::take(&mut b.dropped);
                let seq = self.next.fetch_add(1, Ordering::AcqRel);
                put_gap(&mut b.bytes, &mut b.names, seq, n);
                b.records += 1;
            }
            let seq = self.next.fetch_add(1, Ordering::AcqRel);
            b.spans.compress = self.compress;
            let head = (seq, time, latency);
            let to = (&mut b.bytes, &mut b.spans, &mut b.names);
            put_slot_record(to, format, head, names, body);
            b.records += 1;
            return;
        })
    }
}

thread_local! {
    /// The buffers [`encode_only`] encodes into, reused.
    static SCRATCH: RefCell<(Vec<u8>, Spans)> = RefCell::default();
}

/// Encodes `body` as a record of a `format` log holds it, into a buffer
/// of this thread's, and forgets it ([`Until::Encode`](super::Until::Encode)).
pub(super) fn encode_only(format: LogFormat, body: &dyn Body) {
    let _ = SCRATCH.try_with(|s| {
        let (out, spans) = &mut *s.borrow_mut();
        out.clear();
        spans.begin(0);
        let binary = format == LogFormat::Binary && body.encode_binary(out, spans).is_some();
        if !binary {
            out.clear();
            let _ = body.payload(out).and_then(|()| body.reply(out));
        }
        std::hint::black_box((&*out, spans.values()));
    });
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(b.len() as u16).to_ne_bytes());
    out.extend_from_slice(b);
}

/// Where a record goes: the slot's buffer, its spans and the names of
/// its last record.
type SlotOut<'a> = (&'a mut Vec<u8>, &'a mut Spans, &'a mut Option<[String; 3]>);

fn put_slot_record(
    (out, spans, last): SlotOut<'_>,
    format: LogFormat,
    (seq, time, latency): (u64, u64, u64),
    names: [&str; 3],
    body: &dyn Body,
) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&time.to_ne_bytes());
    out.extend_from_slice(&latency.to_ne_bytes());
    // The binary writer keeps each slot's last names; the JSON Lines one
    // writes them out every time, so it gets them every time.
    let same = format == LogFormat::Binary && last.as_ref().is_some_and(|l| *l == names);
    if same {
        out.push(NAMES_SAME);
    } else {
        out.push(NAMES_GIVEN);
        for n in names {
            put_str(out, n);
        }
        let l = last.get_or_insert_with(Default::default);
        for (l, n) in l.iter_mut().zip(names) {
            l.clear();
            l.push_str(n);
        }
    }
    let codec_at = out.len();
    out.push(CODEC_JSON);
    out.extend_from_slice(&[0; 4]);
    let body_at = out.len();
    spans.begin(body_at);
    let binary = match format {
        LogFormat::Binary => body.encode_binary(out, spans),
        LogFormat::JsonLines => None,
    };
    match binary {
        Some(codec) => out[codec_at] = codec,
        None => {
            spans.begin(body_at);
            out.truncate(body_at);
            let len_at = out.len();
            out.extend_from_slice(&[0; 4]);
            let ok = body.payload(out).is_ok();
            let plen = out.len() - len_at - 4;
            let ok = ok && body.reply(out).is_ok();
            if !ok {
                // A body that cannot be represented is recorded as such:
                // the log is a debugging aid, not a data path.
                out.truncate(len_at + 4);
                out.extend_from_slice(b"\"<unserializable>\"null");
                let plen = b"\"<unserializable>\"".len() as u32;
                out[len_at..len_at + 4].copy_from_slice(&plen.to_ne_bytes());
            } else {
                out[len_at..len_at + 4].copy_from_slice(&(plen as u32).to_ne_bytes());
            }
        }
    }
    let body_len = (out.len() - body_at) as u32;
    out[body_at - 4..body_at].copy_from_slice(&body_len.to_ne_bytes());
    // A binary body's cuts and values (none for a JSON body).
    out.extend_from_slice(&(spans.cuts().len() as u32).to_ne_bytes());
    out.extend_from_slice(spans.cuts());
    out.extend_from_slice(spans.values());
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

struct GapBody(u64);

impl Body for GapBody {
    fn payload(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let _ = write!(out, "{{\"dropped\":{}}}", self.0);
        Ok(())
    }

    fn reply(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.extend_from_slice(b"null");
        Ok(())
    }
}

/// A slot record's names follow it (`NAMES_GIVEN`), or are its slot's
/// last record's (`NAMES_SAME`).
const NAMES_GIVEN: u8 = 0;
const NAMES_SAME: u8 = 1;

fn put_gap(out: &mut Vec<u8>, last: &mut Option<[String; 3]>, seq: u64, n: u64) {
    let names = ["recorder", "recorder", RecordKind::Gap.as_str()];
    let mut spans = Spans::default();
    // Written as for a JSON Lines log, so its names are given in full
    // (never `NAMES_SAME`), and they become the slot's last.
    let format = LogFormat::JsonLines;
    let to = (out, &mut spans, last);
    put_slot_record(to, format, (seq, 0, 0), names, &GapBody(n));
}

/// One record in slot form, borrowed.
struct SlotRecord<'a> {
    seq: u64,
    time: u64,
    latency: u64,
    /// `None`: its slot's last record's.
    names: Option<[&'a [u8]; 3]>,
    codec: u8,
    /// A JSON body (`plen:u32 payload reply`), or a binary body's fixed
    /// bytes.
    body: &'a [u8],
    /// A binary body's cuts ([`Spans::cuts`]) and values.
    cuts: &'a [u8],
    values: &'a [u8],
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> usize {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(a) as usize
}

/// The slot record at `at` of `b` and where the next begins.
fn slot_record(b: &[u8], at: usize) -> (SlotRecord<'_>, usize) {
    let end = at + 4 + u32_at(b, at);
    let mut p = at + 4 + 24 + 1;
    let names = (b[p - 1] == NAMES_GIVEN).then(|| {
        let mut names: [&[u8]; 3] = [&[]; 3];
        for n in &mut names {
            let len = usize::from(u16::from_ne_bytes([b[p], b[p + 1]]));
            *n = &b[p + 2..p + 2 + len];
            p += 2 + len;
        }
        names
    });
    let body_len = u32_at(b, p + 1);
    let body_at = p + 5;
    let cuts_at = body_at + body_len + 4;
    let cuts_len = u32_at(b, cuts_at - 4);
    let rec = SlotRecord {
        seq: u64_at(b, at + 4),
        time: u64_at(b, at + 12),
        latency: u64_at(b, at + 20),
        names,
        codec: b[p],
        body: &b[body_at..body_at + body_len],
        cuts: &b[cuts_at..cuts_at + cuts_len],
        values: &b[cuts_at + cuts_len..end],
    };
    (rec, end)
}

/// A slot's records the writer holds and has not written yet.
#[derive(Default)]
struct Pending {
    chunks: VecDeque<(Vec<u8>, usize)>,
    /// The name indices of the last record written from the slot.
    ids: [u64; 3],
    /// The slot's written buffers, emptied, to give back to that same
    /// slot: each keeps the capacity its slot grew it to, so that a busy
    /// slot is not handed a quiet one's small buffer to grow again.
    spares: Vec<Vec<u8>>,
}

impl Pending {
    fn head_seq(&self) -> Option<u64> {
        let (b, at) = self.chunks.front()?;
        Some(u64_at(b, at + 4))
    }

    /// Drops the first buffer, written, keeping it (emptied) for reuse.
    fn retire_front(&mut self) {
        if let Some((mut c, _)) = self.chunks.pop_front() {
            c.clear();
            self.spares.push(c);
        }
    }

    /// The first buffer is written up to `end`; retired if that is all.
    fn consumed_to(&mut self, end: usize) {
        if let Some((chunk, at)) = self.chunks.front_mut() {
            *at = end;
            if end >= chunk.len() {
                self.retire_front();
            }
        }
    }
}

/// What the writer does to the output.
struct Out {
    out: BufWriter<Box<dyn Write + Send>>,
    format: LogFormat,
    bytes: u64,
    /// The binary form's names, shapes and record heads.
    enc: FrameEncoder,
    /// Frames not yet handed to `out` (at most [`BATCH`] and one record).
    frame: Vec<u8>,
    /// A JSON body's value, in the binary form.
    json: Spans,
    summary: Summary,
}

impl Out {
    /// Writes `r`; `ids` are the name indices of its slot's last record,
    /// and become `r`'s.
    fn emit(&mut self, r: &SlotRecord<'_>, ids: &mut [u64; 3]) -> io::Result<()> {
        // A gap record's names are always given.
        let gap = RecordKind::Gap.as_str().as_bytes();
        if r.names.is_some_and(|n| n[0] == b"recorder" && n[2] == gap) {
            if let Some((p, _)) = json_parts(r.body) {
                #[derive(serde::Deserialize)]
                struct Gap {
                    dropped: u64,
                }
                if let Ok(g) = serde_json::from_slice::<Gap>(p) {
                    self.summary.dropped += g.dropped;
                }
            }
        }
        self.summary.records += 1;
        let at = self.frame.len();
        match self.format {
            LogFormat::JsonLines => {
                let (payload, reply) = json_parts(r.body).unwrap_or((b"null", b"null"));
                let line = &mut self.frame;
                let _ = write!(
                    line,
                    "{{\"seq\":{},\"time\":{},\"latency\":{},\"from\":",
                    r.seq, r.time, r.latency
                );
                for (i, key) in [",\"to\":", ",\"type\":", ""].iter().enumerate() {
                    // Always given in a JSON Lines recording.
                    let s = String::from_utf8_lossy(r.names.map_or(b"?", |n| n[i]));
                    serde_json::to_writer(&mut *line, &*s).map_err(io::Error::other)?;
                    line.extend_from_slice(key.as_bytes());
                }
                line.extend_from_slice(b",\"payload\":");
                line.extend_from_slice(payload);
                line.extend_from_slice(b",\"reply\":");
                line.extend_from_slice(reply);
                line.extend_from_slice(b"}\n");
            }
            LogFormat::Binary => {
                let (fixed, cuts, values) = if r.codec == CODEC_JSON {
                    // No structure to share: the whole body is one value.
                    let (payload, reply) = json_parts(r.body).unwrap_or((b"null", b"null"));
                    let j = &mut self.json;
                    j.json_body(payload, reply);
                    (&[][..], j.cuts(), j.values())
                } else {
                    (r.body, r.cuts, r.values)
                };
                let parts = RecordParts {
                    seq: r.seq,
                    time: r.time,
                    latency: r.latency,
                    names: r.names.map_or(Names::Known(*ids), Names::Given),
                    codec: r.codec,
                    fixed,
                    cuts,
                    values,
                };
                *ids = self.enc.record(&mut self.frame, &parts);
            }
        }
        self.bytes += (self.frame.len() - at) as u64;
        if self.frame.len() >= BATCH {
            self.write_frames()?;
        }
        Ok(())
    }

    /// Hands the frames gathered so far to the file, straight from
    /// `frame`: `out`'s buffer is emptied first, so that they are not
    /// copied into it.
    fn write_frames(&mut self) -> io::Result<()> {
        if !self.frame.is_empty() {
            self.out.flush()?;
            self.out.get_mut().write_all(&self.frame)?;
            self.frame.clear();
        }
        Ok(())
    }

    /// Writes everything gathered and flushes the file.
    fn flush(&mut self) -> io::Result<()> {
        self.write_frames()?;
        self.out.flush()
    }
}

/// The frames the writer gathers before one `write`: as large as the
/// file's buffer was, so that a busy writer makes as few `write`s, and
/// each record is copied once (into `Out::frame`) instead of twice.
const BATCH: usize = 1 << 18;

/// A slot-form JSON body's payload and reply.
fn json_parts(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u32_at(body, 0);
    Some((body.get(4..4 + n)?, body.get(4 + n..)?))
}

/// How long the writer sleeps between rounds (looks at the slots), busy
/// or idle: a busy writer that went round again at once took the slots'
/// mutexes many times per millisecond and wrote a few records a round,
/// on the CPUs the devices need. At 1 ms, the wake-ups and `write`s of a
/// writer keeping up with 130,000 requests a second took about 0.2 us of
/// system time per request more than at 4 ms (BENCHMARKS.md).
const POLL: Duration = Duration::from_millis(4);
/// How often the writer hands what it has written to the file: at most
/// this much (and one round of the slots) is lost when the process is
/// killed (SIGKILL). A busy writer makes at most one `write` per period;
/// an idle one flushes as soon as it finds nothing new.
const FLUSH_EVERY: Duration = Duration::from_millis(4);

/// Where a record is among the writer's pending buffers: its slot, the
/// buffer's place in that slot's queue, and its offset in the buffer.
#[derive(Clone, Copy, Default)]
struct Place {
    slot: u32,
    chunk: u32,
    at: u32,
}

const NOWHERE: Place = Place {
    slot: u32::MAX,
    chunk: 0,
    at: 0,
};

/// Hands `emit` every pending record of seq below `next`, in seq order,
/// and drops them from `pending`; whether there was one.
///
/// The seqs below `next` that are not yet written are dense (every seq is
/// taken under a slot's mutex and put in that slot at once, and
/// everything below the last round's `next` was written then), so each
/// record's place is found by its seq: one pass over each slot's records
/// and one over `order`, instead of comparing the slots' next seqs for
/// every record. `None`, with nothing emitted, if the seqs are not dense
/// after all: [`merge_by_scan`] then merges them.
fn merge_by_index(
    pending: &mut [Pending],
    next: u64,
    order: &mut Vec<Place>,
    emit: &mut impl FnMut(&mut [u64; 3], &SlotRecord<'_>) -> io::Result<()>,
) -> io::Result<Option<bool>> {
    let Some(base) = pending
        .iter()
        .filter_map(Pending::head_seq)
        .filter(|&s| s < next)
        .min()
    else {
        return Ok(Some(false));
    };
    let n = (next - base) as usize;
    if n > u32::MAX as usize || pending.len() > u32::MAX as usize {
        return Ok(None);
    }
    order.clear();
    order.resize(n, NOWHERE);
    let mut found = 0usize;
    for (i, p) in pending.iter().enumerate() {
        'slot: for (k, (chunk, at)) in p.chunks.iter().enumerate() {
            let mut at = if k == 0 { *at } else { 0 };
            while at < chunk.len() {
                let seq = u64_at(chunk, at + 4);
                if seq >= next {
                    // A slot's records are in seq order: the rest are later.
                    break 'slot;
                }
                let Some(place) = seq
                    .checked_sub(base)
                    .and_then(|d| order.get_mut(d as usize))
                else {
                    return Ok(None);
                };
                if place.slot != u32::MAX || at > u32::MAX as usize || k > u32::MAX as usize {
                    return Ok(None);
                }
                *place = Place {
                    slot: i as u32,
                    chunk: k as u32,
                    at: at as u32,
                };
                found += 1;
                at += 4 + u32_at(chunk, at);
            }
        }
    }
    if found != n {
        return Ok(None);
    }
    // Where each slot's first record not written now begins.
    let mut ends: Vec<Option<(usize, usize)>> = vec![None; pending.len()];
    for place in order.iter() {
        let p = &mut pending[place.slot as usize];
        let chunk = &p.chunks[place.chunk as usize].0;
        let (rec, end) = slot_record(chunk, place.at as usize);
        emit(&mut p.ids, &rec)?;
        ends[place.slot as usize] = Some((place.chunk as usize, end));
    }
    for (p, end) in pending.iter_mut().zip(ends) {
        let Some((k, end)) = end else { continue };
        for _ in 0..k {
            p.retire_front();
        }
        p.consumed_to(end);
    }
    Ok(Some(true))
}

/// Hands `emit` every pending record of seq below `next`, in seq order,
/// by looking for the smallest next seq among the slots each time; drops
/// them from `pending`, and says whether there was one.
fn merge_by_scan(
    pending: &mut [Pending],
    next: u64,
    emit: &mut impl FnMut(&mut [u64; 3], &SlotRecord<'_>) -> io::Result<()>,
) -> io::Result<bool> {
    let mut wrote = false;
    // The slot the last record came from and that record's seq: when
    // that slot's next record is the very next seq, it is the
    // smallest of all, and the slots need not be looked through.
    let mut run: Option<(usize, u64)> = None;
    loop {
        let same = run.filter(|&(i, last)| {
            pending[i]
                .head_seq()
                .is_some_and(|s| s == last.wrapping_add(1) && s < next)
        });
        let Some((i, seq)) = same.map(|(i, last)| (i, last + 1)).or_else(|| {
            pending
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.head_seq().map(|s| (i, s)))
                .filter(|&(_, s)| s < next)
                .min_by_key(|&(_, s)| s)
        }) else {
            break;
        };
        run = Some((i, seq));
        let p = &mut pending[i];
        let Some((chunk, at)) = p.chunks.front() else {
            break;
        };
        let (rec, end) = slot_record(chunk, *at);
        emit(&mut p.ids, &rec)?;
        wrote = true;
        p.consumed_to(end);
    }
    Ok(wrote)
}

/// The writer thread: merges the slots into the log until the recording
/// ends, then writes what is left (and the gap counts still owed).
pub(super) fn write_loop(
    shared: Arc<Shared>,
    out: BufWriter<Box<dyn Write + Send>>,
    format: LogFormat,
    bytes: u64,
) -> io::Result<Summary> {
    let mut out = Out {
        out,
        format,
        bytes,
        enc: FrameEncoder::default(),
        frame: Vec::with_capacity(BATCH + 4096),
        json: Spans::default(),
        summary: Summary::default(),
    };
    let mut pending: Vec<Pending> = Vec::new();
    let mut order: Vec<Place> = Vec::new();
    let mut slots: Vec<Arc<Slot>> = Vec::new();
    let mut flushed = Instant::now();
    // Written since the last flush.
    let mut dirty = false;
    loop {
        let last = shared.ended.load(Ordering::Acquire);
        let next = shared.next.load(Ordering::Acquire);
        {
            // Slots are only ever added, at the end.
            let all = lock(&shared.slots);
            if all.len() != slots.len() {
                slots.extend(all[slots.len()..].iter().cloned());
            }
        }
        pending.resize_with(slots.len(), Pending::default);
        // Whether a slot was half full: then the writer goes round again
        // at once, so that its source does not come to wait.
        let mut pressed = false;
        for (slot, p) in slots.iter().zip(&mut pending) {
            let mut b = lock(&slot.buf);
            if b.records == 0 {
                continue;
            }
            pressed |= b.records >= shared.limit / 2 || b.bytes.len() >= super::BUFFER_BYTES / 2;
            let spare = p.spares.pop().unwrap_or_default();
            let full = std::mem::replace(&mut b.bytes, spare);
            b.records = 0;
            drop(b);
            p.chunks.push_back((full, 0));
        }
        let mut emit = |ids: &mut [u64; 3], rec: &SlotRecord<'_>| {
            if shared.drop_taken {
                std::hint::black_box(rec);
                Ok(())
            } else {
                out.emit(rec, ids)
            }
        };
        let wrote = match merge_by_index(&mut pending, next, &mut order, &mut emit)? {
            Some(wrote) => wrote,
            None => merge_by_scan(&mut pending, next, &mut emit)?,
        };
        if last {
            // Counts still owed, as gap records after everything.
            let mut seq = next;
            for slot in &slots {
                let n = std::mem::take(&mut lock(&slot.buf).dropped);
                slot.closed.store(true, Ordering::Relaxed);
                if n > 0 {
                    let mut b = Vec::new();
                    put_gap(&mut b, &mut None, seq, n);
                    seq += 1;
                    out.emit(&slot_record(&b, 0).0, &mut [0; 3])?;
                }
            }
            break;
        }
        dirty |= wrote;
        if dirty && (!wrote || flushed.elapsed() >= FLUSH_EVERY) {
            out.flush()?;
            flushed = Instant::now();
            dirty = false;
        }
        if !pressed {
            thread::sleep(POLL);
        }
    }
    out.flush()?;
    out.summary.bytes = out.bytes;
    Ok(out.summary)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::tests::{entry, header};
    use super::super::{DataMode, Header, RecordOptions, Recorder, Until};
    use super::*;

    /// A sink that keeps what the writer wrote.
    struct Keep(Arc<Mutex<Vec<u8>>>);

    impl Write for Keep {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The bytes of a log of 100 records given to a recorder that stops
    /// them after `until`, and the number of records it says it wrote.
    fn log_until(header: &Header, format: LogFormat, until: Until) -> (Vec<u8>, u64) {
        let sink = Arc::new(Mutex::new(Vec::new()));
        let options = RecordOptions {
            data: DataMode::Hash,
            format,
            until,
            ..RecordOptions::default()
        };
        let out = Box::new(Keep(Arc::clone(&sink)));
        let rec = Recorder::to_writer(out, Path::new("mem"), header, options).expect("recorder");
        for i in 0..100 {
            rec.record(entry(i));
        }
        let summary = rec.finish().expect("finish");
        let bytes = lock(&sink).clone();
        (bytes, summary.records)
    }

    #[test]
    fn test_a_record_stopped_at_a_stage_is_not_written_and_a_whole_one_is() {
        let header = header();
        for format in [LogFormat::JsonLines, LogFormat::Binary] {
            let start = header.log_start(format);
            let (whole, n) = log_until(&header, format, Until::Whole);
            assert_eq!(n, 100, "{format:?}");
            assert!(whole.len() > start.len() + 100, "{format:?}");
            for until in [Until::Hash, Until::Capture, Until::Encode, Until::Slot] {
                // The header alone.
                assert_eq!(
                    log_until(&header, format, until),
                    (start.clone(), 0),
                    "{format:?} {until:?}"
                );
            }
        }
    }

    /// Slots holding the records of `seqs` (each slot's in order), in
    /// buffers of at most `per_chunk` records each.
    fn pending_of(seqs: &[&[u64]], per_chunk: usize) -> Vec<Pending> {
        seqs.iter()
            .map(|slot| {
                let mut p = Pending::default();
                for part in slot.chunks(per_chunk) {
                    let mut b = Vec::new();
                    for &seq in part {
                        put_gap(&mut b, &mut None, seq, seq * 10);
                    }
                    p.chunks.push_back((b, 0));
                }
                p
            })
            .collect()
    }

    type Merge = fn(&mut [Pending], u64, &mut Vec<(usize, u64)>) -> io::Result<bool>;

    fn by_index(p: &mut [Pending], next: u64, got: &mut Vec<(usize, u64)>) -> io::Result<bool> {
        let mut order = Vec::new();
        let mut emit = |ids: &mut [u64; 3], r: &SlotRecord<'_>| {
            // Which slot: the test stores it in the slot's ids.
            got.push((ids[0] as usize, r.seq));
            Ok(())
        };
        Ok(merge_by_index(p, next, &mut order, &mut emit)?.expect("dense seqs"))
    }

    fn by_scan(p: &mut [Pending], next: u64, got: &mut Vec<(usize, u64)>) -> io::Result<bool> {
        let mut emit = |ids: &mut [u64; 3], r: &SlotRecord<'_>| {
            got.push((ids[0] as usize, r.seq));
            Ok(())
        };
        merge_by_scan(p, next, &mut emit)
    }

    #[test]
    fn test_both_merges_write_every_record_below_next_once_in_seq_order() {
        let slots: [&[u64]; 3] = [&[1, 4, 5, 9, 12], &[2, 3, 7, 10], &[6, 8, 11, 13]];
        for per_chunk in [1, 2, 10] {
            for (name, merge) in [("index", by_index as Merge), ("scan", by_scan as Merge)] {
                let mut pending = pending_of(&slots, per_chunk);
                for (i, p) in pending.iter_mut().enumerate() {
                    p.ids[0] = i as u64;
                }
                let mut got = Vec::new();
                // Two rounds: up to 9, then the rest.
                assert!(merge(&mut pending, 9, &mut got).expect("merge"), "{name}");
                let seqs: Vec<u64> = got.iter().map(|&(_, s)| s).collect();
                assert_eq!(seqs, (1..9).collect::<Vec<_>>(), "{name} {per_chunk}");
                for &(slot, seq) in &got {
                    assert!(slots[slot].contains(&seq), "{name}: {seq} from slot {slot}");
                }
                let heads: Vec<_> = pending.iter().map(Pending::head_seq).collect();
                assert_eq!(heads, [Some(9), Some(10), Some(11)], "{name} {per_chunk}");
                got.clear();
                assert!(merge(&mut pending, 14, &mut got).expect("merge"), "{name}");
                let seqs: Vec<u64> = got.iter().map(|&(_, s)| s).collect();
                assert_eq!(seqs, (9..14).collect::<Vec<_>>(), "{name} {per_chunk}");
                assert!(pending.iter().all(|p| p.chunks.is_empty()), "{name}");
                // Emptied buffers go back to their slot.
                assert!(pending.iter().all(|p| !p.spares.is_empty()), "{name}");
                assert!(!merge(&mut pending, 14, &mut got).expect("merge"), "{name}");
            }
        }
    }

    #[test]
    fn test_seqs_that_are_not_dense_are_left_to_the_scan_and_nothing_is_lost() {
        // 3 is missing, and 2 is in two slots.
        for slots in [[&[1, 4][..], &[2, 5][..]], [&[1, 2][..], &[2, 3][..]]] {
            let mut pending = pending_of(&slots, 10);
            let mut order = Vec::new();
            let mut n = 0;
            let mut emit = |_: &mut [u64; 3], _: &SlotRecord<'_>| {
                n += 1;
                Ok(())
            };
            let r = merge_by_index(&mut pending, 6, &mut order, &mut emit).expect("merge");
            assert!(r.is_none());
            assert_eq!(n, 0, "nothing emitted");
            let mut got = Vec::new();
            assert!(by_scan(&mut pending, 6, &mut got).expect("scan"));
            assert_eq!(got.len(), 4, "every record written by the scan");
        }
    }
}
