// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The record of a virtqueue request, in the log's two forms: JSON
//! (version 1's `payload` and `reply`) and the binary codec 1 of
//! `runtime/LOG-FORMAT.md`, written on the queue worker without
//! allocating and read back by replay without JSON.

use std::borrow::Cow;

use switchboard_runtime::recording::binary::{
    get_bytes, get_u8, get_varint, get_zigzag, put_bytes, put_varint, put_zigzag,
    CODEC_VIRTIO_REQUEST,
};
use switchboard_runtime::recording::shape::Spans;
use switchboard_runtime::recording::{Body, Compress, Data, INLINE_MAX, ZSTD_LEVEL};

use crate::models::virtio::{
    copy_into_spare, At, DecodedRequest, External, SeenData, Segment, Trace, WHATS,
};

/// The record of one request: what the driver put in the chain and what the
/// device read, took in and did. The trace is a live request's
/// [`Recorded`](crate::models::virtio::Recorded) (back to its pool once
/// encoded) or one read back from a log.
pub(crate) struct RequestRecord<T = Trace, L = Vec<u32>> {
    pub(crate) queue: u16,
    pub(crate) head: u16,
    pub(crate) readable: L,
    pub(crate) writable: L,
    pub(crate) trace: T,
    pub(crate) len: u32,
}

/// The lengths of a request's readable or writable buffers: a live
/// request's segments, borrowed ([`SegmentLens`]), or a list read back.
pub(crate) trait BufLens {
    fn lens(&self) -> impl ExactSizeIterator<Item = u32> + '_;
}

impl BufLens for Vec<u32> {
    fn lens(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.iter().copied()
    }
}

/// A live request's segments, as their lengths.
pub(crate) struct SegmentLens<'a>(pub(crate) &'a [Segment]);

impl BufLens for SegmentLens<'_> {
    fn lens(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.0.iter().map(|s| s.len)
    }
}

/// A request record's payload as written and read back.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestPayload<R = Vec<At>, I = Vec<External>> {
    pub(crate) queue: u16,
    pub(crate) head: u16,
    pub(crate) readable: Vec<u32>,
    pub(crate) writable: Vec<u32>,
    pub(crate) reads: R,
    pub(crate) inputs: I,
}

/// A request record's reply as written and read back.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestReply<W = Vec<At>, E = Vec<External>> {
    pub(crate) len: u32,
    pub(crate) writes: W,
    pub(crate) effects: E,
}

impl<T: AsRef<Trace> + Send, L: BufLens + Send> Body for RequestRecord<T, L> {
    fn payload(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        serde_json::to_writer(
            out,
            &RequestPayload {
                queue: self.queue,
                head: self.head,
                readable: self.readable.lens().collect(),
                writable: self.writable.lens().collect(),
                reads: &self.trace.as_ref().reads,
                inputs: &self.trace.as_ref().inputs,
            },
        )
    }

    fn reply(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        serde_json::to_writer(
            out,
            &RequestReply {
                len: self.len,
                writes: &self.trace.as_ref().writes,
                effects: &self.trace.as_ref().effects,
            },
        )
    }

    fn encode_binary(&self, out: &mut Vec<u8>, v: &mut Spans) -> Option<u8> {
        let mut seen = Seen::default();
        put_varint(out, u64::from(self.queue));
        v.varint(out, u64::from(self.head));
        for lens in [&self.readable, &self.writable] {
            let lens = lens.lens();
            put_varint(out, lens.len() as u64);
            for l in lens {
                put_varint(out, u64::from(l));
            }
        }
        let t = self.trace.as_ref();
        put_ats(out, v, &t.reads, &mut seen);
        put_externals(out, v, &t.inputs, &mut seen);
        put_varint(out, u64::from(self.len));
        put_ats(out, v, &t.writes, &mut seen);
        put_externals(out, v, &t.effects, &mut seen);
        Some(CODEC_VIRTIO_REQUEST)
    }
}

const DATA_BYTES: u8 = 0;
const DATA_HASH: u8 = 1;
const DATA_SAME: u8 = 2;
const DATA_ZSTD: u8 = 3;
/// A compressed block longer than this once decompressed is corruption:
/// no virtio request moves as much.
const MAX_ZSTD: u64 = 1 << 26;

thread_local! {
    /// This thread's zstd contexts and the buffer it compresses into:
    /// made the first time, then reused, so that compressing allocates
    /// nothing once warm.
    static ZSTD: std::cell::RefCell<Option<ZstdContext>> = const { std::cell::RefCell::new(None) };
}

struct ZstdContext {
    compress: zstd::bulk::Compressor<'static>,
    decompress: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
}

/// Runs `f` with this thread's zstd context; `None` if one cannot be made.
fn with_zstd<R>(f: impl FnOnce(&mut ZstdContext) -> R) -> Option<R> {
    ZSTD.with(|z| {
        let mut z = z.borrow_mut();
        if z.is_none() {
            *z = Some(ZstdContext {
                compress: zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?,
                decompress: zstd::bulk::Decompressor::new().ok()?,
                buf: Vec::new(),
            });
        }
        z.as_mut().map(f)
    })
}

/// Writes `b` compressed (`DATA 0x03`) if that is shorter; `false` (and
/// nothing written) if it is not.
fn put_zstd(out: &mut Vec<u8>, v: &mut Spans, b: &[u8]) -> bool {
    with_zstd(|z| {
        z.buf.clear();
        z.buf.reserve(zstd::zstd_safe::compress_bound(b.len()));
        match z.compress.compress_to_buffer(b, &mut z.buf) {
            Ok(n) if n < b.len() => {
                out.push(DATA_ZSTD);
                put_varint(out, b.len() as u64);
                v.sized(out, &z.buf);
                true
            }
            _ => false,
        }
    })
    .unwrap_or(false)
}
const FLAG_DATA: u8 = 1;
const FLAG_ERRNO: u8 = 2;

/// The bulk data of a record so far, to write a repeat as a reference.
#[derive(Default)]
struct Seen<'a> {
    /// (index among the record's DATA, len, hash), the first few.
    hashes: [(u64, u64, u128); 8],
    n: usize,
    /// (index, bytes) of data held by value and longer than
    /// [`INLINE_MAX`], the first few: a disk request's block passes twice
    /// and is written once.
    bytes: [(u64, &'a [u8]); 4],
    nb: usize,
    count: u64,
}

/// Writes one DATA. Its tag and length are the record's shape; its bytes
/// or hash are values, but for a single byte (a status byte, nearly always
/// the same).
#[inline(always)]
fn put_data<'a>(out: &mut Vec<u8>, v: &mut Spans, d: &'a Data, seen: &mut Seen<'a>) {
    let index = seen.count;
    seen.count += 1;
    match d {
        Data::Bytes(b) if b.len() > INLINE_MAX => {
            if let Some(&(k, _)) = seen.bytes[..seen.nb]
                .iter()
                .find(|(_, s)| s.len() == b.len() && *s == b.as_slice())
            {
                out.push(DATA_SAME);
                put_varint(out, k);
                return;
            }
            if !(v.compress == Compress::Zstd && put_zstd(out, v, b)) {
                out.push(DATA_BYTES);
                v.bytes(out, b);
            }
            if seen.nb < seen.bytes.len() {
                seen.bytes[seen.nb] = (index, b);
                seen.nb += 1;
            }
        }
        Data::Bytes(b) if b.len() == 1 => {
            out.push(DATA_BYTES);
            put_bytes(out, b);
        }
        Data::Bytes(b) => {
            out.push(DATA_BYTES);
            v.bytes(out, b);
        }
        Data::Hash { len, hash } => {
            if let Some(&(k, _, _)) = seen.hashes[..seen.n]
                .iter()
                .find(|(_, l, h)| l == len && h == hash)
            {
                out.push(DATA_SAME);
                put_varint(out, k);
                return;
            }
            out.push(DATA_HASH);
            put_varint(out, *len);
            v.raw(out, &hash.to_le_bytes());
            if seen.n < seen.hashes.len() {
                seen.hashes[seen.n] = (index, *len, *hash);
                seen.n += 1;
            }
        }
    }
}

#[inline(always)]
fn put_ats<'a>(out: &mut Vec<u8>, v: &mut Spans, ats: &'a [At], seen: &mut Seen<'a>) {
    put_varint(out, ats.len() as u64);
    for a in ats {
        put_varint(out, a.at);
        put_data(out, v, &a.data, seen);
    }
}

/// Writes the externals: an offset in a file is a value, the rest the
/// shape.
#[inline(always)]
fn put_externals<'a>(out: &mut Vec<u8>, v: &mut Spans, exts: &'a [External], seen: &mut Seen<'a>) {
    put_varint(out, exts.len() as u64);
    for e in exts {
        // Looked for by address first: a device names its `what` with a
        // literal equal to an entry of `WHATS`, and equal literals are
        // usually merged into one, so this finds it without comparing
        // bytes; the byte compare finds it when they are not (and a name
        // read back from a JSON log, which may be owned).
        let what = &*e.what;
        let known = WHATS
            .iter()
            .position(|w| std::ptr::eq(*w, what))
            .or_else(|| WHATS.iter().position(|w| *w == what));
        match known {
            Some(i) => out.push(i as u8 + 1),
            None => {
                out.push(0);
                put_bytes(out, e.what.as_bytes());
            }
        }
        v.varint(out, e.at);
        put_varint(out, e.len);
        let flags =
            u8::from(e.data.is_some()) * FLAG_DATA + u8::from(e.errno.is_some()) * FLAG_ERRNO;
        out.push(flags);
        if let Some(d) = &e.data {
            put_data(out, v, d, seen);
        }
        if let Some(errno) = e.errno {
            put_zigzag(out, i64::from(errno));
        }
    }
}

#[cold]
fn short() -> String {
    "the request record ends early".to_string()
}

/// A list's count, checked against the bytes left (each entry takes one
/// at least), so that a corrupt count cannot make a reader reserve much.
#[inline]
fn get_count(b: &mut &[u8]) -> Result<usize, String> {
    let n = get_varint(b).ok_or_else(short)?;
    if n > b.len() as u64 {
        return Err(short());
    }
    Ok(n as usize)
}

impl DecodedRequest {
    /// Reads a codec 1 body into `self`. Every field is checked; anything
    /// left over, or a tag not in the format, is an error (and `self`
    /// holds whatever was read before it).
    pub(crate) fn decode(&mut self, body: &[u8]) -> Result<(), String> {
        decode_request_into(body, self)
    }
}

fn decode_request_into(body: &[u8], out: &mut DecodedRequest) -> Result<(), String> {
    let mut b = body;
    out.seen.clear();
    let small = |v: u64, what: &str| -> Result<u32, String> {
        u32::try_from(v).map_err(|_| format!("{what} {v} out of range"))
    };
    let queue = get_varint(&mut b).ok_or_else(short)?;
    let head = get_varint(&mut b).ok_or_else(short)?;
    for l in [&mut out.readable, &mut out.writable] {
        let n = get_count(&mut b)?;
        l.clear();
        for _ in 0..n {
            l.push(small(
                get_varint(&mut b).ok_or_else(short)?,
                "buffer length",
            )?);
        }
    }
    let mut d = Decoder {
        body,
        seen: &mut out.seen,
        spare: &mut out.spare,
    };
    let t = &mut out.trace;
    d.ats(&mut b, &mut t.reads)?;
    d.externals(&mut b, &mut t.inputs)?;
    out.len = small(get_varint(&mut b).ok_or_else(short)?, "reply length")?;
    d.ats(&mut b, &mut t.writes)?;
    d.externals(&mut b, &mut t.effects)?;
    if !b.is_empty() {
        return Err(format!("{} bytes after the request record", b.len()));
    }
    out.queue = u16::try_from(queue).map_err(|_| format!("queue {queue} out of range"))?;
    out.head = u16::try_from(head).map_err(|_| format!("head {head} out of range"))?;
    Ok(())
}

/// Reads codec 1 back as version 1's payload and reply.
pub(crate) fn decode_request(body: &[u8]) -> Result<(RequestPayload, RequestReply), String> {
    let mut d = DecodedRequest::default();
    decode_request_into(body, &mut d)?;
    let t = d.trace;
    Ok((
        RequestPayload {
            queue: d.queue,
            head: d.head,
            readable: d.readable,
            writable: d.writable,
            reads: t.reads,
            inputs: t.inputs,
        },
        RequestReply {
            len: d.len,
            writes: t.writes,
            effects: t.effects,
        },
    ))
}

/// The state of one record's decoding besides the read position.
struct Decoder<'a> {
    /// The whole body (`SeenData::Bytes` are offsets into it).
    body: &'a [u8],
    seen: &'a mut Vec<SeenData>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl Decoder<'_> {
    /// Puts `bytes` into `slot`, reusing its buffer (or a spare one).
    fn set_bytes(&mut self, slot: &mut Data, bytes: &[u8]) {
        if let Data::Bytes(v) = slot {
            v.clear();
            v.extend_from_slice(bytes);
            return;
        }
        *slot = Data::Bytes(copy_into_spare(self.spare, bytes));
    }

    /// Puts the `len` bytes `z` decompresses to into `slot`, reusing its
    /// buffer (or a spare one).
    fn set_zstd(&mut self, slot: &mut Data, z: &[u8], len: u64) -> Result<(), String> {
        if len > MAX_ZSTD {
            return Err(format!("compressed data of {len} bytes"));
        }
        let mut v = match std::mem::replace(slot, Data::Hash { len: 0, hash: 0 }) {
            Data::Bytes(v) => v,
            Data::Hash { .. } => self.spare.pop().unwrap_or_default(),
        };
        v.clear();
        v.reserve(len as usize);
        let n = with_zstd(|c| c.decompress.decompress_to_buffer(z, &mut v))
            .ok_or("no zstd context")?
            .map_err(|e| format!("compressed data that does not decompress: {e}"))?;
        if n as u64 != len {
            return Err(format!(
                "compressed data of {n} bytes where the record says {len}"
            ));
        }
        *slot = Data::Bytes(v);
        Ok(())
    }

    /// Sets `slot` to hashed data, keeping a byte buffer it held.
    fn set_hash(&mut self, slot: &mut Data, len: u64, hash: u128) {
        if let Data::Bytes(v) = std::mem::replace(slot, Data::Hash { len, hash }) {
            self.spare.push(v);
        }
    }

    fn data(&mut self, b: &mut &[u8], slot: &mut Data) -> Result<(), String> {
        let seen = match get_u8(b).ok_or_else(short)? {
            DATA_BYTES => {
                let bytes = get_bytes(b).ok_or_else(short)?;
                let start = bytes.as_ptr() as usize - self.body.as_ptr() as usize;
                self.set_bytes(slot, bytes);
                SeenData::Bytes {
                    start,
                    end: start + bytes.len(),
                }
            }
            DATA_HASH => {
                let len = get_varint(b).ok_or_else(short)?;
                if b.len() < 16 {
                    return Err(short());
                }
                let (h, rest) = b.split_at(16);
                *b = rest;
                let mut a = [0u8; 16];
                a.copy_from_slice(h);
                let hash = u128::from_le_bytes(a);
                self.set_hash(slot, len, hash);
                SeenData::Hash { len, hash }
            }
            DATA_ZSTD => {
                let len = get_varint(b).ok_or_else(short)?;
                let z = get_bytes(b).ok_or_else(short)?;
                let start = z.as_ptr() as usize - self.body.as_ptr() as usize;
                self.set_zstd(slot, z, len)?;
                SeenData::Zstd {
                    start,
                    end: start + z.len(),
                    len,
                }
            }
            DATA_SAME => {
                let k = get_varint(b).ok_or_else(short)?;
                let seen = usize::try_from(k)
                    .ok()
                    .and_then(|k| self.seen.get(k).copied())
                    .ok_or_else(|| format!("data refers to data {k}, which is not before it"))?;
                match seen {
                    SeenData::Hash { len, hash } => self.set_hash(slot, len, hash),
                    SeenData::Bytes { start, end } => {
                        let body = self.body;
                        self.set_bytes(slot, &body[start..end]);
                    }
                    SeenData::Zstd { start, end, len } => {
                        let body = self.body;
                        self.set_zstd(slot, &body[start..end], len)?;
                    }
                }
                seen
            }
            t => return Err(format!("unknown data tag {t}")),
        };
        self.seen.push(seen);
        Ok(())
    }

    fn ats(&mut self, b: &mut &[u8], out: &mut Vec<At>) -> Result<(), String> {
        let n = get_count(b)?;
        truncate_ats(out, n, self.spare);
        for i in 0..n {
            let at = get_varint(b).ok_or_else(short)?;
            if i == out.len() {
                out.push(At {
                    at,
                    data: Data::Hash { len: 0, hash: 0 },
                });
            }
            let slot = &mut out[i];
            slot.at = at;
            self.data(b, &mut slot.data)?;
        }
        Ok(())
    }

    fn externals(&mut self, b: &mut &[u8], out: &mut Vec<External>) -> Result<(), String> {
        let n = get_count(b)?;
        if out.len() > n {
            for e in out.drain(n..) {
                if let Some(Data::Bytes(v)) = e.data {
                    self.spare.push(v);
                }
            }
        }
        for i in 0..n {
            let what = match get_u8(b).ok_or_else(short)? {
                0 => Cow::Owned(
                    std::str::from_utf8(get_bytes(b).ok_or_else(short)?)
                        .map_err(|_| "a `what` that is not UTF-8".to_string())?
                        .to_string(),
                ),
                i if usize::from(i) <= WHATS.len() => Cow::Borrowed(WHATS[usize::from(i) - 1]),
                i => return Err(format!("unknown `what` code {i}")),
            };
            let at = get_varint(b).ok_or_else(short)?;
            let len = get_varint(b).ok_or_else(short)?;
            let flags = get_u8(b).ok_or_else(short)?;
            if flags & !(FLAG_DATA | FLAG_ERRNO) != 0 {
                return Err(format!("unknown flags {flags:#x}"));
            }
            if i == out.len() {
                out.push(External {
                    what: Cow::Borrowed(""),
                    at: 0,
                    len: 0,
                    data: None,
                    errno: None,
                });
            }
            let e = &mut out[i];
            e.what = what;
            e.at = at;
            e.len = len;
            if flags & FLAG_DATA != 0 {
                let mut slot = e.data.take().unwrap_or(Data::Hash { len: 0, hash: 0 });
                let r = self.data(b, &mut slot);
                out[i].data = Some(slot);
                r?;
            } else if let Some(Data::Bytes(v)) = e.data.take() {
                self.spare.push(v);
            }
            out[i].errno = if flags & FLAG_ERRNO != 0 {
                let e = get_zigzag(b).ok_or_else(short)?;
                Some(i32::try_from(e).map_err(|_| format!("errno {e} out of range"))?)
            } else {
                None
            };
        }
        Ok(())
    }
}

/// Keeps the first `n` of `ats`, moving the byte buffers of the rest to
/// `spare`.
fn truncate_ats(ats: &mut Vec<At>, n: usize, spare: &mut Vec<Vec<u8>>) {
    if ats.len() > n {
        for a in ats.drain(n..) {
            if let Data::Bytes(v) = a.data {
                spare.push(v);
            }
        }
    }
}

/// Renders a binary body as version 1's JSON payload and reply: the
/// reader's hook for the codecs of this crate.
pub fn render(
    codec: u8,
    body: &[u8],
    payload: &mut Vec<u8>,
    reply: &mut Vec<u8>,
) -> Result<(), String> {
    if codec != CODEC_VIRTIO_REQUEST {
        return Err(format!("unknown body codec {codec}"));
    }
    let (p, r) = decode_request(body)?;
    serde_json::to_writer(&mut *payload, &p).map_err(|e| e.to_string())?;
    serde_json::to_writer(&mut *reply, &r).map_err(|e| e.to_string())?;
    Ok(())
}

/// Encodes a request record's JSON payload and reply (version 1) as codec
/// 1, into `out`: the codec, or `None` (and `out` as it was) when they
/// are not a request record's or would not render back to the very same
/// text (then the record keeps its JSON body).
/// Its values are marked in `values`, which the caller has begun at
/// `out.len()`.
pub fn encode_json(
    payload: &str,
    reply: &str,
    out: &mut Vec<u8>,
    values: &mut Spans,
) -> Option<u8> {
    if !payload.starts_with("{\"queue\":") {
        return None;
    }
    let p: RequestPayload = serde_json::from_str(payload).ok()?;
    let r: RequestReply = serde_json::from_str(reply).ok()?;
    let record = RequestRecord {
        queue: p.queue,
        head: p.head,
        readable: p.readable,
        writable: p.writable,
        trace: Trace {
            reads: p.reads,
            inputs: p.inputs,
            writes: r.writes,
            effects: r.effects,
        },
        len: r.len,
    };
    let start = out.len();
    let codec = record.encode_binary(out, values)?;
    let (mut body, mut back_p, mut back_r) = (Vec::new(), Vec::new(), Vec::new());
    let same = values.assemble(&out[start..], &mut body).is_ok()
        && render(codec, &body, &mut back_p, &mut back_r).is_ok()
        && back_p == payload.as_bytes()
        && back_r == reply.as_bytes();
    if !same {
        out.truncate(start);
        return None;
    }
    Some(codec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_runtime::recording::DataMode;

    fn record(mode: DataMode) -> RequestRecord {
        let block = vec![0xabu8; 4096];
        let header = [1u8, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0];
        RequestRecord {
            queue: 0,
            head: 17,
            readable: vec![16],
            writable: vec![4096, 1],
            trace: Trace {
                reads: vec![At {
                    at: 0,
                    data: Data::capture(mode, &header),
                }],
                inputs: vec![External {
                    what: "file-read".into(),
                    at: 4096,
                    len: 4096,
                    data: Some(Data::capture(mode, &block)),
                    errno: None,
                }],
                writes: vec![
                    At {
                        at: 0,
                        data: Data::capture(mode, &block),
                    },
                    At {
                        at: 4096,
                        data: Data::capture(mode, &[0]),
                    },
                ],
                effects: vec![External {
                    what: "something-new".into(),
                    at: 0,
                    len: 0,
                    data: None,
                    errno: Some(-5),
                }],
            },
            len: 4097,
        }
    }

    /// `r` in codec 1 after `prefix`, written with `compress`: its fixed
    /// bytes (after the prefix) and its values.
    fn encode_with(r: &RequestRecord, prefix: &[u8], compress: Compress) -> (Vec<u8>, Spans) {
        let mut fixed = prefix.to_vec();
        let mut v = Spans::default();
        v.compress = compress;
        v.begin(fixed.len());
        assert_eq!(
            r.encode_binary(&mut fixed, &mut v),
            Some(CODEC_VIRTIO_REQUEST)
        );
        (fixed, v)
    }

    /// `r`'s codec 1 body as version 3 holds it (values in place),
    /// written with `compress`.
    fn body_with(r: &RequestRecord, compress: Compress) -> Vec<u8> {
        let (fixed, v) = encode_with(r, &[], compress);
        let mut body = Vec::new();
        v.assemble(&fixed, &mut body).expect("the values fit");
        body
    }

    fn body(r: &RequestRecord) -> Vec<u8> {
        body_with(r, Compress::None)
    }

    fn json(r: &RequestRecord) -> (String, String) {
        let (mut p, mut q) = (Vec::new(), Vec::new());
        r.payload(&mut p).expect("payload");
        r.reply(&mut q).expect("reply");
        (
            String::from_utf8(p).expect("utf8"),
            String::from_utf8(q).expect("utf8"),
        )
    }

    #[test]
    fn test_binary_renders_as_the_json_form() {
        for mode in [DataMode::Hash, DataMode::Value] {
            let r = record(mode);
            let bin = body(&r);
            let (mut p, mut q) = (Vec::new(), Vec::new());
            render(CODEC_VIRTIO_REQUEST, &bin, &mut p, &mut q).expect("render");
            assert_eq!(
                (
                    String::from_utf8(p).expect("utf8"),
                    String::from_utf8(q).expect("utf8")
                ),
                json(&r)
            );
        }
    }

    #[test]
    fn test_a_hashed_4k_read_is_small_and_holds_its_block_once() {
        let mut r = record(DataMode::Hash);
        r.trace.effects.clear();
        let bin = body(&r);
        // The request header by value (16 bytes), the block's hash once
        // (16: the guest-memory write refers to the file read's), and
        // about 37 bytes of structure.
        assert!(bin.len() <= 72, "{} bytes", bin.len());
        let mut p = Vec::new();
        r.payload(&mut p).expect("json");
        r.reply(&mut p).expect("json");
        assert!(
            bin.len() * 4 < p.len(),
            "{} vs {} bytes",
            bin.len(),
            p.len()
        );
    }

    #[test]
    fn test_a_by_value_4k_read_holds_its_block_once_and_renders_it_twice() {
        let mut r = record(DataMode::Value);
        r.trace.effects.clear();
        let bin = body(&r);
        // One 4 KiB block and a reference to it, not two blocks.
        assert!(
            (4096..4096 + 64).contains(&bin.len()),
            "{} bytes",
            bin.len()
        );
        let (mut p, mut q) = (Vec::new(), Vec::new());
        render(CODEC_VIRTIO_REQUEST, &bin, &mut p, &mut q).expect("render");
        let (jp, jq) = json(&r);
        assert_eq!(String::from_utf8(p).expect("utf8"), jp);
        assert_eq!(String::from_utf8(q).expect("utf8"), jq);
        // A block that differs by one byte is not a repeat.
        let mut other = vec![0xabu8; 4096];
        other[4095] = 0;
        r.trace.writes[0].data = Data::Bytes(other);
        let bin = body(&r);
        assert!(bin.len() > 8192, "{} bytes", bin.len());
    }

    #[test]
    fn test_a_json_request_encodes_as_codec_1_only_if_it_renders_back_the_same() {
        let (p, q) = json(&record(DataMode::Hash));
        let mut out = vec![9];
        let mut v = Spans::default();
        v.begin(1);
        assert_eq!(
            encode_json(&p, &q, &mut out, &mut v),
            Some(CODEC_VIRTIO_REQUEST)
        );
        let (fixed, values) = encode_with(&record(DataMode::Hash), &[9], Compress::None);
        assert_eq!(out, fixed);
        assert_eq!(v.cuts(), values.cuts());
        assert_eq!(v.values(), values.values());
        // Spacing the encoder would not write back: kept as JSON.
        let spaced = p.replacen(",", ", ", 1);
        let mut out = vec![9];
        assert_eq!(encode_json(&spaced, &q, &mut out, &mut v), None);
        assert_eq!(out, [9]);
        assert_eq!(encode_json("{\"len\":4}", "null", &mut out, &mut v), None);
    }

    #[test]
    fn test_every_cut_and_a_bad_tag_are_errors() {
        let bin = body(&record(DataMode::Hash));
        for cut in 0..bin.len() {
            assert!(decode_request(&bin[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bin.clone();
        longer.push(0);
        assert!(decode_request(&longer).is_err());
    }

    /// A blk read of 4 KiB at `sector`, from descriptor `head`, hashed.
    fn blk_read(head: u16, sector: u64) -> RequestRecord {
        let mut header = [0u8; 16];
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let block: Vec<u8> = (0..4096).map(|i| (i as u64 ^ sector) as u8).collect();
        let hashed = Data::capture(DataMode::Hash, &block);
        RequestRecord {
            queue: 0,
            head,
            readable: vec![16],
            writable: vec![4096, 1],
            trace: Trace {
                reads: vec![At {
                    at: 0,
                    data: Data::Bytes(header.to_vec()),
                }],
                inputs: vec![External {
                    what: "file-read".into(),
                    at: sector * 512,
                    len: 4096,
                    data: Some(hashed.clone()),
                    errno: None,
                }],
                writes: vec![
                    At {
                        at: 0,
                        data: hashed,
                    },
                    At {
                        at: 4096,
                        data: Data::Bytes(vec![0]),
                    },
                ],
                effects: vec![],
            },
            len: 4097,
        }
    }

    #[test]
    fn test_a_hashed_4k_read_takes_at_most_64_bytes_once_its_shape_is_known() {
        use switchboard_runtime::recording::shape::{FrameEncoder, Names, RecordParts};
        let mut enc = FrameEncoder::default();
        let mut sizes = Vec::new();
        // Heads and sectors as a 1 GiB disk under a queue of 256 gives
        // them, 3 us apart, answered after 60 us.
        for (i, (head, sector)) in [(3u16, 2_000_000u64), (200, 1_234_567), (77, 8)]
            .iter()
            .enumerate()
        {
            let (fixed, v) = encode_with(&blk_read(*head, *sector), &[], Compress::None);
            let mut frames = Vec::new();
            enc.record(
                &mut frames,
                &RecordParts {
                    seq: i as u64 + 1,
                    time: 5_000_000_000 + i as u64 * 3_000,
                    latency: 60_000,
                    names: Names::Given([b"driver/q0", b"disk0", b"read"]),
                    codec: CODEC_VIRTIO_REQUEST,
                    fixed: &fixed,
                    cuts: v.cuts(),
                    values: v.values(),
                },
            );
            sizes.push(frames.len());
        }
        // The first record's frames hold the names and the shape too.
        assert!(sizes[0] > 100, "{sizes:?}");
        // A record: length, tag, seq, time, latency, shape (6); head (2),
        // the request header (16), the file offset (4), the hash (16); CRC (4).
        assert!(sizes[1] <= 64 && sizes[2] <= 64, "{sizes:?}");
    }

    #[test]
    fn test_zstd_holds_a_compressible_block_smaller_and_renders_it_the_same() {
        let mut r = record(DataMode::Value);
        r.trace.effects.clear();
        let plain = body(&r);
        let bin = body_with(&r, Compress::Zstd);
        // 4 KiB of one byte value: a few dozen bytes, held once.
        assert!(
            bin.len() < 120,
            "{} bytes (plain {})",
            bin.len(),
            plain.len()
        );
        let (mut p, mut q) = (Vec::new(), Vec::new());
        render(CODEC_VIRTIO_REQUEST, &bin, &mut p, &mut q).expect("render");
        assert_eq!(
            (
                String::from_utf8(p).expect("utf8"),
                String::from_utf8(q).expect("utf8")
            ),
            json(&r)
        );
        // Decoded in place twice (buffers reused), the same.
        let mut d = DecodedRequest::default();
        for _ in 0..2 {
            d.decode(&bin).expect("decode");
            assert!(matches!(&d.trace.writes[0].data, Data::Bytes(b) if b == &vec![0xabu8; 4096]));
        }
        // Any cut is an error, never other data.
        for cut in 0..bin.len() {
            assert!(decode_request(&bin[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn test_zstd_leaves_an_incompressible_block_as_it_is() {
        let mut r = record(DataMode::Value);
        r.trace.effects.clear();
        // xorshift bytes: nothing for zstd to take.
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        r.trace.inputs[0].data = Some(Data::Bytes(noise.clone()));
        r.trace.writes[0].data = Data::Bytes(noise);
        let plain = body(&r);
        let bin = body_with(&r, Compress::Zstd);
        assert_eq!(bin, plain);
    }
}
