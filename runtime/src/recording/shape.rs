// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Record shapes (format version 4): what repeats from one record to the
//! next is written once.
//!
//! A record's codec writes its body as before (version 3's body) and
//! marks the parts that are *values*: a request's head, the bytes and
//! hashes of its data, a file offset ([`Spans`]). Everything else (the
//! names, the codec, the counts, buffer lengths, data lengths, tags) is the
//! record's *shape*: its body with the values cut out. A shape is written
//! once, in a shape frame, and a record then holds only its head, the
//! index of its shape, and its values. A reader puts the body back
//! together from the two ([`ShapeTable::record`]) and decodes it as it
//! decodes a version 3 body, so the codecs read one layout.
//!
//! The key of a shape (what a shape frame holds after its index, and what
//! an inline shape holds) is, in `LOG-FORMAT.md`'s notation:
//!
//! ```text
//! KEY   = from:varint to:varint type:varint codec:u8 n:varint PIECE*n trailing:bytes
//! PIECE = fixed:bytes kind:u8 [len:varint if kind == RAW]
//! ```
//!
//! where the body is `fixed0 value0 fixed1 value1 ... trailing`, and a
//! value is a varint ([`VALUE_VARINT`]), `len` raw bytes ([`VALUE_RAW`]),
//! all the values left ([`VALUE_REST`]), or a varint length and that many
//! bytes ([`VALUE_SIZED`]).

use std::collections::HashMap;

use super::binary::{
    get_bytes, get_u8, get_varint, put_bytes, put_frame_with, put_varint, TAG_NAME, TAG_RECORD,
};

/// Frame tag: a shape (format version 4).
pub const TAG_SHAPE: u8 = b'S';
/// The first format version with shapes.
pub const VERSION_SHAPES: u32 = 4;
/// A value that is one varint (self-delimiting).
pub const VALUE_VARINT: u8 = 0;
/// A value of a length the shape gives.
pub const VALUE_RAW: u8 = 1;
/// A value that is every value byte left.
pub const VALUE_REST: u8 = 2;
/// A value that is a varint length and that many bytes.
pub const VALUE_SIZED: u8 = 3;
/// A writer defines at most this many shapes; a record of a shape it
/// meets after that holds its shape inline (index 0).
pub const MAX_SHAPES: u64 = 1 << 14;

/// Where a codec cut one value out of its body: the offset in the
/// shape's fixed bytes where the value sat, its kind, and for a
/// [`VALUE_RAW`] value its length. [`Spans`] holds them as bytes,
/// [`Cut::BYTES`] each, so that the writer compares one record's cuts
/// with the last one's as bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// Offset in the fixed bytes.
    pub at: u32,
    /// `VALUE_VARINT`, `VALUE_RAW`, `VALUE_REST` or `VALUE_SIZED`.
    pub kind: u8,
    /// A raw value's length; 0 for the other kinds.
    pub len: u32,
}

impl Cut {
    /// The size of a cut as [`Spans::cuts`] holds it (native-endian).
    pub const BYTES: usize = 9;

    #[inline(always)]
    fn put(self, out: &mut Vec<u8>) {
        let mut b = [0u8; Cut::BYTES];
        b[..4].copy_from_slice(&self.at.to_ne_bytes());
        b[4] = self.kind;
        b[5..].copy_from_slice(&self.len.to_ne_bytes());
        out.extend_from_slice(&b);
    }

    /// The cuts in `b` (as [`Spans::cuts`] holds them); a partial cut at
    /// the end is ignored.
    pub fn iter(b: &[u8]) -> impl ExactSizeIterator<Item = Cut> + '_ {
        b.chunks_exact(Cut::BYTES).map(|c| Cut {
            at: u32::from_ne_bytes([c[0], c[1], c[2], c[3]]),
            kind: c[4],
            len: u32::from_ne_bytes([c[5], c[6], c[7], c[8]]),
        })
    }
}

/// The values of one body as its codec writes it. A codec writes each
/// value through these methods instead of [`put_varint`] and
/// `extend_from_slice`, and everything else (the body's *fixed bytes*)
/// to its output as before. The values go to this struct's own buffer, in
/// order, with a [`Cut`] marking where each sat among the fixed bytes: the
/// body comes out already split into its shape and its values, which is
/// what a version 4 record holds, so the writer copies the values and
/// compares the fixed bytes and cuts with the last record's.
#[derive(Debug, Default)]
pub struct Spans {
    cuts: Vec<u8>,
    values: Vec<u8>,
    base: usize,
    /// How the codec should write bulk data held by value (the
    /// recorder's [`RecordOptions::compress`](super::RecordOptions)).
    pub compress: super::Compress,
}

impl Spans {
    /// Starts a body whose fixed bytes begin at `out.len() == base`: the
    /// values and cuts so far are forgotten.
    pub fn begin(&mut self, base: usize) {
        self.cuts.clear();
        self.values.clear();
        self.base = base;
    }

    #[inline(always)]
    fn cut(&mut self, out: &[u8], kind: u8, len: usize) {
        Cut {
            at: out.len().saturating_sub(self.base) as u32,
            kind,
            len: len as u32,
        }
        .put(&mut self.cuts);
    }

    /// Writes a varint value.
    #[inline(always)]
    pub fn varint(&mut self, out: &[u8], v: u64) {
        self.cut(out, VALUE_VARINT, 0);
        put_varint(&mut self.values, v);
    }

    /// Writes bytes whose length the shape holds (written before them as
    /// part of the shape, or fixed by the codec, as a hash's 16).
    #[inline(always)]
    pub fn raw(&mut self, out: &[u8], b: &[u8]) {
        self.cut(out, VALUE_RAW, b.len());
        self.values.extend_from_slice(b);
    }

    /// Writes length-prefixed bytes: the length to `out` (the shape), the
    /// bytes a value.
    #[inline(always)]
    pub fn bytes(&mut self, out: &mut Vec<u8>, b: &[u8]) {
        put_varint(out, b.len() as u64);
        self.raw(out, b);
    }

    /// Writes length-prefixed bytes as one value, length and all: bytes
    /// whose length varies from record to record (compressed data).
    #[inline]
    pub fn sized(&mut self, out: &[u8], b: &[u8]) {
        self.cut(out, VALUE_SIZED, 0);
        put_varint(&mut self.values, b.len() as u64);
        self.values.extend_from_slice(b);
    }

    /// Writes, through `f`, one value of every value byte left: a body
    /// with no structure to share.
    pub fn rest_with(&mut self, out: &[u8], f: impl FnOnce(&mut Vec<u8>)) {
        self.cut(out, VALUE_REST, 0);
        f(&mut self.values);
    }

    /// Begins a body with no fixed bytes whose one value is a JSON
    /// payload and reply ([`put_json_body`](super::binary::put_json_body)):
    /// a [`CODEC_JSON`](super::binary::CODEC_JSON) body, which has no
    /// structure to share.
    pub fn json_body(&mut self, payload: &[u8], reply: &[u8]) {
        self.begin(0);
        self.rest_with(&[], |v| super::binary::put_json_body(v, payload, reply));
    }

    /// The cuts so far, [`Cut::BYTES`] each (read with [`Cut::iter`]).
    pub fn cuts(&self) -> &[u8] {
        &self.cuts
    }

    /// The values so far, in body order: what the record frame holds.
    pub fn values(&self) -> &[u8] {
        &self.values
    }

    /// The body as version 3 holds it: `fixed` (the bytes the codec wrote
    /// to its output since [`Spans::begin`]) with the values put back
    /// where they were cut. Rebuilt as a reader rebuilds it
    /// ([`ShapeTable::record`]), so an error means the values do not fit.
    pub fn assemble(&self, fixed: &[u8], body: &mut Vec<u8>) -> Result<(), String> {
        let mut key = Vec::new();
        put_key(&mut key, [0; 3], 0, fixed, &self.cuts);
        let mut table = ShapeTable::default();
        let shape = table.parse_key(&mut key.as_slice())?;
        table.assemble(&shape, &self.values, body)
    }
}

/// Appends the key of a shape (see the module docs) to `key`: its names
/// and codec, and the pieces of `fixed` between `cuts`.
fn put_key(key: &mut Vec<u8>, names: [u64; 3], codec: u8, fixed: &[u8], cuts: &[u8]) {
    for n in names {
        put_varint(key, n);
    }
    key.push(codec);
    let cuts = Cut::iter(cuts);
    put_varint(key, cuts.len() as u64);
    let mut at = 0usize;
    for c in cuts {
        // Cuts are in order and within the fixed bytes when a codec
        // made them through `Spans`; clamped all the same, so that a
        // wrong one makes a wrong shape, never a panic.
        let to = (c.at as usize).clamp(at, fixed.len());
        put_bytes(key, &fixed[at..to]);
        key.push(c.kind);
        if c.kind == VALUE_RAW {
            put_varint(key, u64::from(c.len));
        }
        at = to;
    }
    put_bytes(key, &fixed[at..]);
}

/// Writes a binary log's frames after its header (version 4): name and
/// shape frames the first time each is met, then the record frames. Used
/// by the recorder's writer thread and by `switchboard log --convert`.
#[derive(Debug)]
pub struct FrameEncoder {
    names: HashMap<Box<[u8]>, u64>,
    /// The last name looked up at each place of a head (from, to, type)
    /// and its index: most records repeat their predecessor's names, so
    /// this skips the map's hashing.
    last: [Option<(Box<[u8]>, u64)>; 3],
    shapes: HashMap<Box<[u8]>, u64>,
    /// The last record's shape, as it came, and its index: most records
    /// repeat their predecessor's shape, so this skips building its key.
    last_shape: LastShape,
    heads: super::binary::HeadCoder,
    /// The key of the last record's shape.
    key: Vec<u8>,
}

#[derive(Debug)]
struct LastShape {
    names: [u64; 3],
    codec: u8,
    fixed: Vec<u8>,
    cuts: Vec<u8>,
    /// `u64::MAX` before the first record.
    index: u64,
}

impl Default for FrameEncoder {
    fn default() -> Self {
        FrameEncoder {
            names: HashMap::new(),
            last: Default::default(),
            shapes: HashMap::new(),
            last_shape: LastShape {
                names: [0; 3],
                codec: 0,
                fixed: Vec::new(),
                cuts: Vec::new(),
                index: u64::MAX,
            },
            heads: super::binary::HeadCoder::new(VERSION_SHAPES),
            key: Vec::new(),
        }
    }
}

/// One record to encode: its head, names and codec, and its body as a
/// codec wrote it through [`Spans`]: fixed bytes, cuts and values.
#[derive(Clone, Copy, Debug)]
pub struct RecordParts<'a> {
    /// Sequence number.
    pub seq: u64,
    /// Delivery time, ns.
    pub time: u64,
    /// Time until the reply, ns.
    pub latency: u64,
    /// Sender, receiver and message type.
    pub names: Names<'a>,
    /// The body's codec.
    pub codec: u8,
    /// The body's fixed bytes.
    pub fixed: &'a [u8],
    /// Where its values were cut ([`Spans::cuts`]).
    pub cuts: &'a [u8],
    /// Its values ([`Spans::values`]).
    pub values: &'a [u8],
}

/// A record's sender, receiver and message type.
#[derive(Clone, Copy, Debug)]
pub enum Names<'a> {
    /// As bytes.
    Given([&'a [u8]; 3]),
    /// As the indices [`FrameEncoder::record`] gave back for an earlier
    /// record with the same names (a writer that knows a record repeats
    /// its predecessor's names skips looking them up).
    Known([u64; 3]),
}

impl FrameEncoder {
    /// Number of name frames written so far.
    pub fn names(&self) -> usize {
        self.names.len()
    }

    fn name_at(&mut self, out: &mut Vec<u8>, at: usize, n: &[u8]) -> u64 {
        if let Some((name, i)) = &self.last[at] {
            if **name == *n {
                return *i;
            }
        }
        let i = match self.names.get(n) {
            Some(&i) => i,
            None => {
                let i = self.names.len() as u64;
                self.names.insert(n.into(), i);
                put_frame_with(out, |o| {
                    o.push(TAG_NAME);
                    put_varint(o, i);
                    o.extend_from_slice(n);
                });
                i
            }
        };
        self.last[at] = Some((n.into(), i));
        i
    }

    /// The index of `r`'s shape, writing its shape frame to `out` the
    /// first time it is met (0 past [`MAX_SHAPES`]: then `self.key` is
    /// its key, for the record to carry).
    fn shape_of(&mut self, out: &mut Vec<u8>, names: [u64; 3], r: &RecordParts<'_>) -> u64 {
        let l = &mut self.last_shape;
        if l.index != u64::MAX
            && l.names == names
            && l.codec == r.codec
            && l.fixed == r.fixed
            && l.cuts == r.cuts
        {
            return l.index;
        }
        self.key.clear();
        put_key(&mut self.key, names, r.codec, r.fixed, r.cuts);
        let index = match self.shapes.get(self.key.as_slice()) {
            Some(&i) => i,
            None if (self.shapes.len() as u64) < MAX_SHAPES => {
                let i = self.shapes.len() as u64 + 1;
                self.shapes.insert(self.key.as_slice().into(), i);
                let key = &self.key;
                put_frame_with(out, |o| {
                    o.push(TAG_SHAPE);
                    put_varint(o, i);
                    o.extend_from_slice(key);
                });
                i
            }
            None => 0,
        };
        let l = &mut self.last_shape;
        l.names = names;
        l.codec = r.codec;
        l.fixed.clear();
        l.fixed.extend_from_slice(r.fixed);
        l.cuts.clear();
        l.cuts.extend_from_slice(r.cuts);
        l.index = index;
        index
    }

    /// Appends the frames of one record to `out`: any name and shape
    /// frame it needs first, then the record frame. Gives back the
    /// indices of its names.
    pub fn record(&mut self, out: &mut Vec<u8>, r: &RecordParts<'_>) -> [u64; 3] {
        let names = match r.names {
            Names::Given(n) => [0, 1, 2].map(|i| self.name_at(out, i, n[i])),
            Names::Known(ids) => ids,
        };
        let shape = self.shape_of(out, names, r);
        let (heads, key) = (&mut self.heads, &self.key);
        put_frame_with(out, |o| {
            o.push(TAG_RECORD);
            heads.put_seq_time(o, r.seq, r.time);
            put_varint(o, r.latency);
            put_varint(o, shape);
            if shape == 0 {
                o.extend_from_slice(key);
            }
            o.extend_from_slice(r.values);
        });
        names
    }
}

/// A shape as a reader holds it.
#[derive(Clone, Copy, Debug)]
struct Shape {
    names: [u64; 3],
    codec: u8,
    /// Its pieces: `pieces[first..first + n]`.
    first: u32,
    n: u32,
    /// The trailing fixed bytes: `bytes[trail.0..trail.1]`.
    trail: (u32, u32),
    /// Whether the body is exactly the values (no fixed bytes, one
    /// `VALUE_REST`): then it is the record's values, not a copy.
    whole: bool,
}

#[derive(Clone, Copy, Debug)]
struct Piece {
    fixed: (u32, u32),
    kind: u8,
    len: u32,
}

/// The shapes a reader has met (index 1 up), and the bytes they hold.
#[derive(Debug, Default)]
pub struct ShapeTable {
    shapes: Vec<Shape>,
    pieces: Vec<Piece>,
    bytes: Vec<u8>,
}

/// The fixed fields of a version 4 record, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShapedHead {
    /// Sequence number.
    pub seq: u64,
    /// Delivery time, ns.
    pub time: u64,
    /// Time until the reply, ns.
    pub latency: u64,
    /// Name indices of from, to and type.
    pub names: [u64; 3],
    /// The body's codec.
    pub codec: u8,
}

/// Where a decoded record's body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyAt {
    /// `payload[start..]`: the record's values are its body.
    Values(usize),
    /// The buffer passed to [`ShapeTable::record`].
    Assembled,
}

fn bad(why: &str) -> String {
    why.to_string()
}

impl ShapeTable {
    /// The number of shapes defined.
    pub fn len(&self) -> usize {
        self.shapes.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.shapes.is_empty()
    }

    /// Parses a key off the front of `k`, adding its bytes and pieces to
    /// the table's (not yet its shape list); `k` is left after it.
    fn parse_key(&mut self, k: &mut &[u8]) -> Result<Shape, String> {
        let short = || bad("a shape that ends early");
        let mut names = [0u64; 3];
        for n in &mut names {
            *n = get_varint(k).ok_or_else(short)?;
        }
        let codec = get_u8(k).ok_or_else(short)?;
        let n = get_varint(k).ok_or_else(short)?;
        if n > k.len() as u64 {
            return Err(short());
        }
        let first = self.pieces.len() as u32;
        let mut fixed_len = 0;
        let mut rest_at = None;
        for i in 0..n as usize {
            let fixed = get_bytes(k).ok_or_else(short)?;
            fixed_len += fixed.len();
            let start = self.bytes.len() as u32;
            self.bytes.extend_from_slice(fixed);
            let kind = get_u8(k).ok_or_else(short)?;
            let len = match kind {
                VALUE_VARINT | VALUE_SIZED => 0,
                VALUE_RAW => u32::try_from(get_varint(k).ok_or_else(short)?)
                    .map_err(|_| bad("a value longer than a frame"))?,
                VALUE_REST if rest_at.is_none() => {
                    rest_at = Some(i);
                    0
                }
                VALUE_REST => return Err(bad("a shape with two rest values")),
                k => return Err(format!("unknown value kind {k}")),
            };
            self.pieces.push(Piece {
                fixed: (start, self.bytes.len() as u32),
                kind,
                len,
            });
        }
        let trailing = get_bytes(k).ok_or_else(short)?;
        fixed_len += trailing.len();
        let t0 = self.bytes.len() as u32;
        self.bytes.extend_from_slice(trailing);
        Ok(Shape {
            names,
            codec,
            first,
            n: n as u32,
            trail: (t0, self.bytes.len() as u32),
            whole: n == 1 && fixed_len == 0 && rest_at == Some(0),
        })
    }

    /// Reads a shape frame's payload after its tag: it must define the
    /// next index.
    pub fn define(&mut self, mut p: &[u8]) -> Result<(), String> {
        let index = get_varint(&mut p).ok_or_else(|| bad("a shape frame that ends early"))?;
        if index != self.shapes.len() as u64 + 1 {
            return Err(format!(
                "shape {index} defined where shape {} is next",
                self.shapes.len() + 1
            ));
        }
        let (np, nb) = (self.pieces.len(), self.bytes.len());
        let parsed = self.parse_key(&mut p).and_then(|s| match p.len() {
            0 => Ok(s),
            n => Err(format!("{n} bytes after a shape")),
        });
        match parsed {
            Ok(s) => {
                self.shapes.push(s);
                Ok(())
            }
            Err(e) => {
                self.pieces.truncate(np);
                self.bytes.truncate(nb);
                Err(e)
            }
        }
    }

    /// Decodes a version 4 record frame's payload (tag included), with
    /// `heads` for its `seq` and `time`: its head, and its body either in
    /// `payload` or put together in `body`. `heads` moves on only for a
    /// record that decodes.
    pub fn record(
        &mut self,
        heads: &mut super::binary::HeadCoder,
        payload: &[u8],
        body: &mut Vec<u8>,
    ) -> Result<(ShapedHead, BodyAt), String> {
        let short = || bad("a record that ends early");
        let mut p = payload;
        if get_u8(&mut p) != Some(TAG_RECORD) {
            return Err(bad("not a record"));
        }
        let mut coder = *heads;
        let (seq, time) = coder.get_seq_time(&mut p).ok_or_else(short)?;
        let latency = get_varint(&mut p).ok_or_else(short)?;
        let index = get_varint(&mut p).ok_or_else(short)?;
        let (np, nb) = (self.pieces.len(), self.bytes.len());
        let shape = if index == 0 {
            // Inline: the key, then the values. Its length is only known
            // by parsing it, so parse it from here; the values follow.
            self.parse_key(&mut p)
        } else {
            self.shapes
                .get((index - 1) as usize)
                .copied()
                .ok_or_else(|| format!("a record of shape {index}, which is not defined"))
        };
        let result = shape.and_then(|s| {
            let at = if s.whole {
                BodyAt::Values(payload.len() - p.len())
            } else {
                self.assemble(&s, p, body)?;
                BodyAt::Assembled
            };
            Ok((
                ShapedHead {
                    seq,
                    time,
                    latency,
                    names: s.names,
                    codec: s.codec,
                },
                at,
            ))
        });
        if index == 0 {
            self.pieces.truncate(np);
            self.bytes.truncate(nb);
        }
        if result.is_ok() {
            *heads = coder;
        }
        result
    }

    /// Puts a body back together from `shape` and `values`.
    fn assemble(&self, s: &Shape, mut v: &[u8], body: &mut Vec<u8>) -> Result<(), String> {
        body.clear();
        let fixed = |r: (u32, u32)| &self.bytes[r.0 as usize..r.1 as usize];
        for piece in &self.pieces[s.first as usize..(s.first + s.n) as usize] {
            body.extend_from_slice(fixed(piece.fixed));
            let n = match piece.kind {
                VALUE_VARINT => v
                    .iter()
                    .take(10)
                    .position(|&b| b < 0x80)
                    .map(|i| i + 1)
                    .ok_or_else(|| bad("a value varint that does not end"))?,
                VALUE_RAW => piece.len as usize,
                VALUE_SIZED => {
                    let mut p = v;
                    let len =
                        get_varint(&mut p).ok_or_else(|| bad("a sized value that ends early"))?;
                    let head = v.len() - p.len();
                    usize::try_from(len)
                        .ok()
                        .and_then(|l| l.checked_add(head))
                        .ok_or_else(|| bad("a sized value longer than a frame"))?
                }
                _ => v.len(),
            };
            if n > v.len() {
                return Err(bad("the record's values end early"));
            }
            let (value, rest) = v.split_at(n);
            body.extend_from_slice(value);
            v = rest;
        }
        body.extend_from_slice(fixed(s.trail));
        if !v.is_empty() {
            return Err(format!("{} value bytes after the record's last", v.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::binary::{take_frame, HeadCoder};

    /// A body `7 head 4 header 4096 offset` with head, header and offset
    /// as values, written through `spans` after a byte that is not the
    /// body's: its fixed bytes, and the whole body as version 3 holds it.
    fn body(head: u64, header: &[u8; 4], offset: u64, spans: &mut Spans) -> (Vec<u8>, Vec<u8>) {
        let mut out = vec![0xEE];
        spans.begin(1);
        out.push(7);
        spans.varint(&out, head);
        spans.bytes(&mut out, header);
        put_varint(&mut out, 4096);
        spans.varint(&out, offset);
        let mut whole = vec![7];
        put_varint(&mut whole, head);
        whole.push(4);
        whole.extend_from_slice(header);
        put_varint(&mut whole, 4096);
        put_varint(&mut whole, offset);
        (out[1..].to_vec(), whole)
    }

    /// Encodes one record of `fixed` and `spans` onto `log`.
    fn record(
        enc: &mut FrameEncoder,
        log: &mut Vec<u8>,
        (seq, time): (u64, u64),
        names: [&[u8]; 3],
        fixed: &[u8],
        spans: &Spans,
    ) {
        enc.record(
            log,
            &RecordParts {
                seq,
                time,
                latency: 300,
                names: Names::Given(names),
                codec: 1,
                fixed,
                cuts: spans.cuts(),
                values: spans.values(),
            },
        );
    }

    const NAMES: [&[u8]; 3] = [b"q0", b"disk0", b"read"];

    fn decode_all(log: &[u8]) -> Vec<(ShapedHead, Vec<u8>)> {
        let mut table = ShapeTable::default();
        let mut heads = HeadCoder::new(VERSION_SHAPES);
        let mut at = 0;
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some((p, n)) = take_frame(&log[at..]).expect("frame") {
            at += n;
            match p[0] {
                TAG_NAME => {}
                TAG_SHAPE => table.define(&p[1..]).expect("shape"),
                _ => {
                    let (h, b) = table.record(&mut heads, p, &mut buf).expect("record");
                    let body = match b {
                        BodyAt::Values(i) => p[i..].to_vec(),
                        BodyAt::Assembled => buf.clone(),
                    };
                    out.push((h, body));
                }
            }
        }
        out
    }

    fn frames(log: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let (p, n) = take_frame(&log[at..]).ok()??;
            at += n;
            Some(p.to_vec())
        })
    }

    fn shapes_in(log: &[u8]) -> usize {
        frames(log).filter(|p| p[0] == TAG_SHAPE).count()
    }

    #[test]
    fn test_records_of_one_shape_share_it_and_come_back_whole() {
        let mut enc = FrameEncoder::default();
        let mut log = Vec::new();
        let mut bodies = Vec::new();
        let mut spans = Spans::default();
        for i in 0..5u64 {
            let (fixed, whole) = body(i * 40, &[i as u8; 4], i << 20, &mut spans);
            let mut assembled = Vec::new();
            spans.assemble(&fixed, &mut assembled).expect("fits");
            assert_eq!(assembled, whole);
            record(&mut enc, &mut log, (i + 1, i * 1000), NAMES, &fixed, &spans);
            bodies.push(whole);
        }
        let got = decode_all(&log);
        assert_eq!(got.len(), 5);
        for (i, (h, b)) in got.iter().enumerate() {
            assert_eq!(b, &bodies[i]);
            assert_eq!((h.seq, h.time, h.codec), (i as u64 + 1, i as u64 * 1000, 1));
            assert_eq!(h.names, [0, 1, 2]);
        }
        // One shape frame for all five.
        assert_eq!(shapes_in(&log), 1);
    }

    #[test]
    fn test_records_that_differ_only_in_names_or_cuts_are_other_shapes() {
        let mut enc = FrameEncoder::default();
        let mut log = Vec::new();
        let mut spans = Spans::default();
        // The same fixed bytes, the value cut after the first byte, then
        // after the second, then after the first again under other names.
        let fixed = [1u8, 2];
        let mut want = Vec::new();
        for (i, (cut, names)) in [(1, NAMES), (2, NAMES), (1, [b"q1" as &[u8], b"d", b"w"])]
            .into_iter()
            .enumerate()
        {
            spans.begin(0);
            spans.varint(&fixed[..cut], 99);
            let mut whole = fixed[..cut].to_vec();
            put_varint(&mut whole, 99);
            whole.extend_from_slice(&fixed[cut..]);
            record(&mut enc, &mut log, (i as u64 + 1, 0), names, &fixed, &spans);
            want.push(whole);
        }
        let got = decode_all(&log);
        let bodies: Vec<_> = got.iter().map(|(_, b)| b.clone()).collect();
        assert_eq!(bodies, want);
        assert_eq!(got[2].0.names, [3, 4, 5]);
        assert_eq!(shapes_in(&log), 3);
    }

    #[test]
    fn test_a_body_with_no_structure_is_its_values() {
        let mut enc = FrameEncoder::default();
        let mut log = Vec::new();
        let b = b"\x05hello{}".to_vec();
        let mut spans = Spans::default();
        spans.begin(0);
        spans.rest_with(&[], |v| v.extend_from_slice(&b));
        record(&mut enc, &mut log, (1, 0), NAMES, &[], &spans);
        let got = decode_all(&log);
        assert_eq!(got[0].1, b);
    }

    #[test]
    fn test_values_that_do_not_fit_the_shape_are_refused() {
        let mut enc = FrameEncoder::default();
        let mut log = Vec::new();
        let mut spans = Spans::default();
        let (fixed, _) = body(3, b"abcd", 9, &mut spans);
        record(&mut enc, &mut log, (1, 0), NAMES, &fixed, &spans);
        let mut table = ShapeTable::default();
        let mut heads = HeadCoder::new(VERSION_SHAPES);
        let all: Vec<_> = frames(&log).collect();
        let shape = all.iter().find(|p| p[0] == TAG_SHAPE).expect("shape");
        table.define(&shape[1..]).expect("defines");
        assert!(table.define(&shape[1..]).is_err(), "an index twice");
        let rec = all.last().expect("record");
        let mut buf = Vec::new();
        for cut in 1..rec.len() {
            let before = heads;
            assert!(
                table.record(&mut heads, &rec[..cut], &mut buf).is_err(),
                "cut {cut}"
            );
            assert_eq!(heads, before);
        }
        let mut longer = rec.clone();
        longer.push(0);
        assert!(table.record(&mut heads, &longer, &mut buf).is_err());
        assert!(table.record(&mut heads, rec, &mut buf).is_ok());
        // Values that do not fit the cuts are refused as a reader would.
        spans.begin(0);
        spans.raw(&[], &[1, 2]);
        let mut one = spans;
        one.values.pop();
        assert!(one.assemble(&[], &mut buf).is_err());
    }

    #[test]
    fn test_past_the_shape_limit_records_carry_their_shape() {
        let mut enc = FrameEncoder::default();
        let mut log = Vec::new();
        let mut spans = Spans::default();
        let mut bodies = Vec::new();
        for i in 0..MAX_SHAPES + 3 {
            // A different fixed length each time: a new shape.
            let mut b = Vec::new();
            spans.begin(0);
            put_varint(&mut b, i);
            spans.varint(&b, i * 7);
            record(&mut enc, &mut log, (i + 1, 0), NAMES, &b, &spans);
            put_varint(&mut b, i * 7);
            bodies.push(b);
        }
        // The last one twice: a repeat of an inline shape is inline too.
        let i = MAX_SHAPES + 2;
        let mut b = Vec::new();
        put_varint(&mut b, i);
        record(&mut enc, &mut log, (i + 2, 0), NAMES, &b, &spans);
        put_varint(&mut b, i * 7);
        bodies.push(b);
        let got = decode_all(&log);
        assert_eq!(got.len(), bodies.len());
        assert!(got.iter().zip(&bodies).all(|((_, g), b)| g == b));
        assert_eq!(shapes_in(&log) as u64, MAX_SHAPES);
    }
}
