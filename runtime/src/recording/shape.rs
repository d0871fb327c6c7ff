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

/// One value of a body: `body[start..end]`, of kind `VALUE_*`.
///
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Where it starts in the body.
    pub start: u32,
    /// Where it ends.
    pub end: u32,
    /// `VALUE_VARINT`, `VALUE_RAW`, `VALUE_REST` or `VALUE_SIZED`.
    pub kind: u32,
}

impl Span {
    /// The size of a span as [`Spans::put_bytes`] writes it.
    pub const BYTES: usize = 12;

    /// A span from its [`Spans::put_bytes`] form (native-endian).
    pub fn from_bytes(b: &[u8]) -> Span {
        let at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Span {
            start: at(0),
            end: at(4),
            kind: at(8),
        }
    }
}

/// The values of one body as its codec writes it: a codec writes a value
/// through these methods instead of [`put_varint`] and `extend_from_slice`,
/// and writes the rest of its body as before.
#[derive(Debug, Default)]
pub struct Spans {
    spans: Vec<Span>,
    base: usize,
    /// How the codec should write bulk data held by value (the
    /// recorder's [`RecordOptions::compress`](super::RecordOptions)).
    pub compress: super::Compress,
}

impl Spans {
    /// Starts a body that begins at `out.len() == base`.
    pub fn begin(&mut self, base: usize) {
        self.spans.clear();
        self.base = base;
    }

    #[inline]
    fn mark(&mut self, start: usize, end: usize, kind: u8) {
        self.spans.push(Span {
            start: (start - self.base) as u32,
            end: (end - self.base) as u32,
            kind: u32::from(kind),
        });
    }

    /// Writes a varint value.
    #[inline]
    pub fn varint(&mut self, out: &mut Vec<u8>, v: u64) {
        let start = out.len();
        put_varint(out, v);
        self.mark(start, out.len(), VALUE_VARINT);
    }

    /// Writes bytes whose length the shape holds (written before them as
    /// part of the shape, or fixed by the codec, as a hash's 16).
    #[inline]
    pub fn raw(&mut self, out: &mut Vec<u8>, b: &[u8]) {
        let start = out.len();
        out.extend_from_slice(b);
        self.mark(start, out.len(), VALUE_RAW);
    }

    /// Writes length-prefixed bytes: the length in the shape, the bytes a
    /// value.
    #[inline]
    pub fn bytes(&mut self, out: &mut Vec<u8>, b: &[u8]) {
        put_varint(out, b.len() as u64);
        self.raw(out, b);
    }

    /// Writes length-prefixed bytes as one value, length and all: bytes
    /// whose length varies from record to record (compressed data).
    #[inline]
    pub fn sized(&mut self, out: &mut Vec<u8>, b: &[u8]) {
        let start = out.len();
        put_varint(out, b.len() as u64);
        out.extend_from_slice(b);
        self.mark(start, out.len(), VALUE_SIZED);
    }

    /// Marks the body from `start` (an offset in it) to its end as one
    /// value of every byte left: a body with no structure to share.
    pub fn rest_from(&mut self, start: usize, end: usize) {
        self.spans.push(Span {
            start: start as u32,
            end: end as u32,
            kind: u32::from(VALUE_REST),
        });
    }

    /// The values marked so far, in body order.
    pub fn as_slice(&self) -> &[Span] {
        &self.spans
    }

    /// Appends the values marked so far to `out` as native-endian
    /// bytes, [`Span::BYTES`] each (read back with [`Span::from_bytes`]).
    pub fn put_bytes(&self, out: &mut Vec<u8>) {
        out.reserve(self.spans.len() * Span::BYTES);
        for s in &self.spans {
            let mut b = [0u8; Span::BYTES];
            b[..4].copy_from_slice(&s.start.to_ne_bytes());
            b[4..8].copy_from_slice(&s.end.to_ne_bytes());
            b[8..].copy_from_slice(&s.kind.to_ne_bytes());
            out.extend_from_slice(&b);
        }
    }
}

/// Appends the key of `body` (cut at `spans`) to `key` and its values to
/// `values`.
fn split(
    names: [u64; 3],
    codec: u8,
    body: &[u8],
    spans: &[Span],
    key: &mut Vec<u8>,
    values: &mut Vec<u8>,
) {
    for n in names {
        put_varint(key, n);
    }
    key.push(codec);
    put_varint(key, spans.len() as u64);
    let mut at = 0usize;
    for s in spans {
        let (start, end) = (s.start as usize, s.end as usize);
        put_bytes(key, &body[at..start]);
        key.push(s.kind as u8);
        if s.kind == u32::from(VALUE_RAW) {
            put_varint(key, (end - start) as u64);
        }
        values.extend_from_slice(&body[start..end]);
        at = end;
    }
    put_bytes(key, &body[at..]);
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
    /// The key of the last record's shape and its index.
    last_shape: (Vec<u8>, u64),
    heads: super::binary::HeadCoder,
    key: Vec<u8>,
    values: Vec<u8>,
}

impl Default for FrameEncoder {
    fn default() -> Self {
        FrameEncoder {
            names: HashMap::new(),
            last: Default::default(),
            shapes: HashMap::new(),
            last_shape: (Vec::new(), u64::MAX),
            heads: super::binary::HeadCoder::new(VERSION_SHAPES),
            key: Vec::new(),
            values: Vec::new(),
        }
    }
}

/// One record to encode: its head, names, codec, body and the values
/// marked in the body.
#[derive(Clone, Copy, Debug)]
pub struct RecordParts<'a> {
    /// Sequence number.
    pub seq: u64,
    /// Delivery time, ns.
    pub time: u64,
    /// Time until the reply, ns.
    pub latency: u64,
    /// Sender, receiver and message type.
    pub names: [&'a [u8]; 3],
    /// The body's codec.
    pub codec: u8,
    /// The body, as version 3 holds it.
    pub body: &'a [u8],
    /// Its values.
    pub spans: &'a [Span],
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

    /// Appends the frames of one record to `out`: any name and shape
    /// frame it needs first, then the record frame.
    pub fn record(&mut self, out: &mut Vec<u8>, r: &RecordParts<'_>) {
        let names = [0, 1, 2].map(|i| self.name_at(out, i, r.names[i]));
        self.key.clear();
        self.values.clear();
        split(
            names,
            r.codec,
            r.body,
            r.spans,
            &mut self.key,
            &mut self.values,
        );
        let shape = if self.last_shape.0 == self.key {
            self.last_shape.1
        } else {
            let shape = match self.shapes.get(self.key.as_slice()) {
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
            self.last_shape.0.clear();
            self.last_shape.0.extend_from_slice(&self.key);
            self.last_shape.1 = shape;
            shape
        };
        let (heads, key, values) = (&mut self.heads, &self.key, &self.values);
        put_frame_with(out, |o| {
            o.push(TAG_RECORD);
            heads.put_seq_time(o, r.seq, r.time);
            put_varint(o, r.latency);
            put_varint(o, shape);
            if shape == 0 {
                o.extend_from_slice(key);
            }
            o.extend_from_slice(values);
        });
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

    /// Parses a key, adding its bytes and pieces to the table's (not yet
    /// its shape list).
    fn parse_key(&mut self, mut k: &[u8]) -> Result<Shape, String> {
        let short = || bad("a shape that ends early");
        let mut names = [0u64; 3];
        for n in &mut names {
            *n = get_varint(&mut k).ok_or_else(short)?;
        }
        let codec = get_u8(&mut k).ok_or_else(short)?;
        let n = get_varint(&mut k).ok_or_else(short)?;
        if n > k.len() as u64 {
            return Err(short());
        }
        let first = self.pieces.len() as u32;
        let mut fixed_len = 0;
        let mut rest_at = None;
        for i in 0..n as usize {
            let fixed = get_bytes(&mut k).ok_or_else(short)?;
            fixed_len += fixed.len();
            let start = self.bytes.len() as u32;
            self.bytes.extend_from_slice(fixed);
            let kind = get_u8(&mut k).ok_or_else(short)?;
            let len = match kind {
                VALUE_VARINT | VALUE_SIZED => 0,
                VALUE_RAW => u32::try_from(get_varint(&mut k).ok_or_else(short)?)
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
        let trailing = get_bytes(&mut k).ok_or_else(short)?;
        fixed_len += trailing.len();
        let t0 = self.bytes.len() as u32;
        self.bytes.extend_from_slice(trailing);
        if !k.is_empty() {
            return Err(format!("{} bytes after a shape", k.len()));
        }
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
        match self.parse_key(p) {
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
            // by parsing it, so parse it from here and see where it ended.
            let key =
                get_inline_key(&mut p).ok_or_else(|| bad("an inline shape that ends early"))?;
            self.parse_key(key)
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

/// Splits an inline key off the front of `p` by walking its layout.
fn get_inline_key<'a>(p: &mut &'a [u8]) -> Option<&'a [u8]> {
    let start = *p;
    let mut k = *p;
    for _ in 0..3 {
        get_varint(&mut k)?;
    }
    get_u8(&mut k)?;
    let n = get_varint(&mut k)?;
    if n > k.len() as u64 {
        return None;
    }
    for _ in 0..n {
        get_bytes(&mut k)?;
        if get_u8(&mut k)? == VALUE_RAW {
            get_varint(&mut k)?;
        }
    }
    get_bytes(&mut k)?;
    let used = start.len() - k.len();
    *p = k;
    Some(&start[..used])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::binary::{take_frame, HeadCoder};

    /// A body `q head 16-bytes-of-header offset` with head, header and
    /// offset as values.
    fn body(head: u64, header: &[u8; 4], offset: u64, spans: &mut Spans) -> Vec<u8> {
        let mut out = vec![0xEE];
        spans.begin(1);
        out.push(7);
        spans.varint(&mut out, head);
        spans.bytes(&mut out, header);
        put_varint(&mut out, 4096);
        spans.varint(&mut out, offset);
        out[1..].to_vec()
    }

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

    #[test]
    fn test_records_of_one_shape_share_it_and_come_back_whole() {
        let mut enc = FrameEncoder::default();
        let mut log = Vec::new();
        let mut bodies = Vec::new();
        let mut spans = Spans::default();
        for i in 0..5u64 {
            let b = body(i * 40, &[i as u8; 4], i << 20, &mut spans);
            enc.record(
                &mut log,
                &RecordParts {
                    seq: i + 1,
                    time: i * 1000,
                    latency: 300,
                    names: [b"q0", b"disk0", b"read"],
                    codec: 1,
                    body: &b,
                    spans: spans.as_slice(),
                },
            );
            bodies.push(b);
        }
        let got = decode_all(&log);
        assert_eq!(got.len(), 5);
        for (i, (h, b)) in got.iter().enumerate() {
            assert_eq!(b, &bodies[i]);
            assert_eq!((h.seq, h.time, h.codec), (i as u64 + 1, i as u64 * 1000, 1));
            assert_eq!(h.names, [0, 1, 2]);
        }
        // One shape frame for all five.
        let shapes = frames(&log).filter(|p| p[0] == TAG_SHAPE).count();
        assert_eq!(shapes, 1);
    }

    fn frames(log: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let (p, n) = take_frame(&log[at..]).ok()??;
            at += n;
            Some(p.to_vec())
        })
    }

    #[test]
    fn test_a_body_with_no_structure_is_its_values() {
        let mut enc = FrameEncoder::default();
        let mut log = Vec::new();
        let b = b"\x05hello{}".to_vec();
        let mut spans = Spans::default();
        spans.begin(0);
        spans.rest_from(0, b.len());
        enc.record(
            &mut log,
            &RecordParts {
                seq: 1,
                time: 0,
                latency: 0,
                names: [b"a", b"b", b"c"],
                codec: 0,
                body: &b,
                spans: spans.as_slice(),
            },
        );
        let got = decode_all(&log);
        assert_eq!(got[0].1, b);
    }

    #[test]
    fn test_values_that_do_not_fit_the_shape_are_refused() {
        let mut enc = FrameEncoder::default();
        let mut log = Vec::new();
        let mut spans = Spans::default();
        let b = body(3, b"abcd", 9, &mut spans);
        enc.record(
            &mut log,
            &RecordParts {
                seq: 1,
                time: 0,
                latency: 0,
                names: [b"a", b"b", b"c"],
                codec: 1,
                body: &b,
                spans: spans.as_slice(),
            },
        );
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
            spans.varint(&mut b, i * 7);
            enc.record(
                &mut log,
                &RecordParts {
                    seq: i + 1,
                    time: 0,
                    latency: 0,
                    names: [b"a", b"b", b"c"],
                    codec: 1,
                    body: &b,
                    spans: spans.as_slice(),
                },
            );
            bodies.push(b);
        }
        let got = decode_all(&log);
        assert_eq!(got.len(), bodies.len());
        assert!(got.iter().zip(&bodies).all(|((_, g), b)| g == b));
        let defined = frames(&log).filter(|p| p[0] == TAG_SHAPE).count() as u64;
        assert_eq!(defined, MAX_SHAPES);
    }
}
