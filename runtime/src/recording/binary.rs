// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The binary log format (versions 2 to 4): frames, varints and CRC32C;
//! version 4's shapes are in [`super::shape`].
//!
//! `runtime/LOG-FORMAT.md` is the specification; this module is its
//! encoder and decoder. A log is [`MAGIC`] followed by frames, each
//! `LEN PAYLOAD CRC`: `LEN` is the payload's length as a varint, `CRC` the
//! CRC32C (Castagnoli) of `LEN` and `PAYLOAD`, little-endian. The payload's
//! first byte says what the frame is ([`TAG_HEADER`], [`TAG_NAME`],
//! [`TAG_RECORD`]). A frame whose checksum does not match is
//! [`FrameError::Corrupt`]; one that the file ends inside is
//! [`FrameError::Truncated`]: neither is ever parsed.

/// The first 8 bytes of a binary log. (A JSON Lines log starts with `{`.)
pub const MAGIC: [u8; 8] = *b"\x89SBLOG2\n";
/// Frame tag: the header, as the JSON object version 1 puts on line 1.
pub const TAG_HEADER: u8 = b'H';
/// Frame tag: a name (an actor id or a message type) for the name table.
pub const TAG_NAME: u8 = b'N';
/// Frame tag: one record.
pub const TAG_RECORD: u8 = b'R';
/// Body codec: a JSON payload and a JSON reply.
pub const CODEC_JSON: u8 = 0;
/// Body codec: a virtio request, as `switchboard-devices` encodes it.
pub const CODEC_VIRTIO_REQUEST: u8 = 1;
/// No frame is longer than this (a longer `LEN` is corruption).
pub const MAX_FRAME: u64 = 1 << 30;

/// Appends `v` as an unsigned LEB128 varint.
#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an unsigned LEB128 varint off the front of `buf`; `None` if
/// `buf` ends inside it or it is longer than 10 bytes.
#[inline]
pub fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    // Most varints of a log are one byte (counts, names, small offsets).
    if let Some((&b, rest)) = buf.split_first() {
        if b < 0x80 {
            *buf = rest;
            return Some(u64::from(b));
        }
    }
    get_varint_long(buf)
}

#[inline(never)]
fn get_varint_long(buf: &mut &[u8]) -> Option<u64> {
    // Ten bytes at hand (a varint's most): the loop runs over a slice of a
    // known length, unrolled with no bounds checks. A record's head has
    // two or three varints of a few bytes.
    let (v, n) = match buf.first_chunk::<10>() {
        Some(a) => varint_prefix(a),
        None => varint_prefix(buf),
    }?;
    *buf = &buf[n..];
    Some(v)
}

/// The varint at the front of `b` and its length in bytes.
#[inline(always)]
fn varint_prefix(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &x) in b.iter().enumerate().take(10) {
        v |= u64::from(x & 0x7f) << (7 * i);
        if x < 0x80 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Appends `v` zigzag-encoded (small magnitudes are short either sign).
#[inline]
pub fn put_zigzag(out: &mut Vec<u8>, v: i64) {
    put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// Reads a zigzag varint.
#[inline]
pub fn get_zigzag(buf: &mut &[u8]) -> Option<i64> {
    get_varint(buf).map(|u| ((u >> 1) as i64) ^ -((u & 1) as i64))
}

/// Appends a length-prefixed byte string.
#[inline]
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Reads a length-prefixed byte string.
#[inline]
pub fn get_bytes<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = usize::try_from(get_varint(buf)?).ok()?;
    if n > buf.len() {
        return None;
    }
    let (b, rest) = buf.split_at(n);
    *buf = rest;
    Some(b)
}

/// Reads one byte.
#[inline]
pub fn get_u8(buf: &mut &[u8]) -> Option<u8> {
    let (&b, rest) = buf.split_first()?;
    *buf = rest;
    Some(b)
}

/// Appends one frame holding `payload` (its first byte is the tag).
pub fn put_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let start = out.len();
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Appends one frame whose payload is written by `fill`: the length is
/// patched in after. `fill` must write at least the tag.
pub fn put_frame_with(out: &mut Vec<u8>, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    // Room for a 1-byte length: most records are shorter than 128 bytes,
    // and a longer payload moves (once, by the few bytes of its length).
    out.push(0);
    fill(out);
    let len = (out.len() - start - 1) as u64;
    if len < 0x80 {
        out[start] = len as u8;
    } else {
        let mut prefix = [0u8; 10];
        let mut n = 0;
        let mut v = len;
        while v >= 0x80 {
            prefix[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        prefix[n] = v as u8;
        out.splice(start..start + 1, prefix[..=n].iter().copied());
    }
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Why a frame cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The input ends inside the frame: `have` bytes of it are present.
    Truncated {
        /// Bytes of the frame present.
        have: usize,
    },
    /// The frame is damaged: its checksum does not match, or its length
    /// cannot be.
    Corrupt {
        /// What is wrong.
        why: String,
    },
}

/// Splits the first frame off `buf`: its payload and the bytes it takes.
/// `Ok(None)` when `buf` is empty.
pub fn take_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut rest = buf;
    let len = match get_varint(&mut rest) {
        Some(len) => len,
        None if buf.len() < 10 => return Err(FrameError::Truncated { have: buf.len() }),
        None => {
            return Err(FrameError::Corrupt {
                why: "bad frame length".into(),
            })
        }
    };
    if len == 0 || len > MAX_FRAME {
        return Err(FrameError::Corrupt {
            why: format!("impossible frame length {len}"),
        });
    }
    let head = buf.len() - rest.len();
    let total = head + len as usize + 4;
    if buf.len() < total {
        return Err(FrameError::Truncated { have: buf.len() });
    }
    let body_end = head + len as usize;
    let want = u32::from_le_bytes([
        buf[body_end],
        buf[body_end + 1],
        buf[body_end + 2],
        buf[body_end + 3],
    ]);
    let got = crc32c::crc32c(&buf[..body_end]);
    if got != want {
        return Err(FrameError::Corrupt {
            why: format!("checksum mismatch (CRC32C {got:08x}, recorded {want:08x})"),
        });
    }
    Ok(Some((&buf[head..body_end], total)))
}

/// The fixed fields of a record frame, decoded; the body borrows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHead<'a> {
    /// Sequence number.
    pub seq: u64,
    /// Delivery time, ns since the recording started.
    pub time: u64,
    /// Time until the reply, ns.
    pub latency: u64,
    /// Name-table index of the sender.
    pub from: u64,
    /// Name-table index of the receiver.
    pub to: u64,
    /// Name-table index of the message type.
    pub kind: u64,
    /// The body's codec ([`CODEC_JSON`], [`CODEC_VIRTIO_REQUEST`], ...).
    pub codec: u8,
    /// The body, as its codec wrote it.
    pub body: &'a [u8],
}

/// The first format version whose records give `seq` and `time` as the
/// difference from the record before ([`HeadCoder`]).
pub const VERSION_DELTA_HEADS: u32 = 3;

/// Writes or reads the record heads of one log in file order. From
/// version 3 on ([`VERSION_DELTA_HEADS`]) a record's `seq` is written as
/// `zigzag(seq - (previous seq + 1))` (0 in a dense log: one byte) and its
/// `time` as `zigzag(time - previous time)`, both from 0 before the first
/// record; version 2 writes both as they are. The state moves on only for
/// a head that was written or read whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadCoder {
    delta: bool,
    seq: u64,
    time: u64,
}

impl HeadCoder {
    /// The coder of a log of format `version`.
    pub fn new(version: u32) -> Self {
        HeadCoder {
            delta: version >= VERSION_DELTA_HEADS,
            seq: 0,
            time: 0,
        }
    }

    /// Appends a record frame's payload (tag included) to `out`.
    pub fn put(&mut self, out: &mut Vec<u8>, head: &RecordHead<'_>) {
        if !self.delta {
            return put_record(out, head);
        }
        out.push(TAG_RECORD);
        self.put_seq_time(out, head.seq, head.time);
        put_record_rest(out, head);
    }

    /// Appends a record's `seq` and `time` as deltas (version 3 on) and
    /// moves on.
    pub fn put_seq_time(&mut self, out: &mut Vec<u8>, seq: u64, time: u64) {
        put_zigzag(out, seq.wrapping_sub(self.seq).wrapping_sub(1) as i64);
        put_zigzag(out, time.wrapping_sub(self.time) as i64);
        self.seq = seq;
        self.time = time;
    }

    /// Reads a record's `seq` and `time` as deltas (version 3 on) and
    /// moves on; a caller that may still refuse the record works on a
    /// copy.
    pub fn get_seq_time(&mut self, p: &mut &[u8]) -> Option<(u64, u64)> {
        let seq = self.seq.wrapping_add(1).wrapping_add(get_zigzag(p)? as u64);
        let time = self.time.wrapping_add(get_zigzag(p)? as u64);
        self.seq = seq;
        self.time = time;
        Some((seq, time))
    }

    /// Decodes a record frame's payload (tag included), of version 2 or
    /// 3 (version 4's records are read by
    /// [`ShapeTable::record`](super::shape::ShapeTable::record)).
    pub fn get<'a>(&mut self, payload: &'a [u8]) -> Option<RecordHead<'a>> {
        if !self.delta {
            return get_record(payload);
        }
        let mut p = payload;
        if get_u8(&mut p)? != TAG_RECORD {
            return None;
        }
        let mut coder = *self;
        let (seq, time) = coder.get_seq_time(&mut p)?;
        let head = get_record_rest(p, seq, time)?;
        *self = coder;
        Some(head)
    }
}

/// Appends a record frame's payload (tag included) to `out`, as version
/// 2 writes it (see [`HeadCoder`] for version 3).
pub fn put_record(out: &mut Vec<u8>, head: &RecordHead<'_>) {
    out.push(TAG_RECORD);
    put_varint(out, head.seq);
    put_varint(out, head.time);
    put_record_rest(out, head);
}

/// The head after `seq` and `time`, then the body: the same in every
/// version.
fn put_record_rest(out: &mut Vec<u8>, head: &RecordHead<'_>) {
    put_varint(out, head.latency);
    put_varint(out, head.from);
    put_varint(out, head.to);
    put_varint(out, head.kind);
    out.push(head.codec);
    out.extend_from_slice(head.body);
}

/// Decodes a record frame's payload (tag included), as version 2 writes
/// it (see [`HeadCoder`] for version 3).
pub fn get_record(payload: &[u8]) -> Option<RecordHead<'_>> {
    let mut p = payload;
    if get_u8(&mut p)? != TAG_RECORD {
        return None;
    }
    let seq = get_varint(&mut p)?;
    let time = get_varint(&mut p)?;
    get_record_rest(p, seq, time)
}

fn get_record_rest(mut p: &[u8], seq: u64, time: u64) -> Option<RecordHead<'_>> {
    Some(RecordHead {
        seq,
        time,
        latency: get_varint(&mut p)?,
        from: get_varint(&mut p)?,
        to: get_varint(&mut p)?,
        kind: get_varint(&mut p)?,
        codec: get_u8(&mut p)?,
        body: p,
    })
}

/// Appends a [`CODEC_JSON`] body.
pub fn put_json_body(out: &mut Vec<u8>, payload: &[u8], reply: &[u8]) {
    put_bytes(out, payload);
    out.extend_from_slice(reply);
}

/// Splits a [`CODEC_JSON`] body into payload and reply.
pub fn get_json_body(body: &[u8]) -> Option<(&str, &str)> {
    let mut b = body;
    let payload = std::str::from_utf8(get_bytes(&mut b)?).ok()?;
    let reply = std::str::from_utf8(b).ok()?;
    Some((payload, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        let mut p = vec![TAG_HEADER];
        p.extend_from_slice(br#"{"format":"switchboard-log"}"#);
        put_frame(&mut out, &p);
        for (i, name) in ["driver/q0", "disk0", "read"].iter().enumerate() {
            let mut p = vec![TAG_NAME];
            put_varint(&mut p, i as u64);
            p.extend_from_slice(name.as_bytes());
            put_frame(&mut out, &p);
        }
        for seq in 1..=5u64 {
            let mut body = Vec::new();
            put_json_body(&mut body, br#"{"i":1}"#, b"null");
            let head = RecordHead {
                seq,
                time: seq * 1000,
                latency: 7,
                from: 0,
                to: 1,
                kind: 2,
                codec: CODEC_JSON,
                body: &body,
            };
            put_frame_with(&mut out, |o| put_record(o, &head));
        }
        out
    }

    /// Frames of `buf` after the magic: payloads, or the error at the end.
    fn frames(buf: &[u8]) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let mut at = MAGIC.len();
        let mut out = Vec::new();
        loop {
            match take_frame(&buf[at..]) {
                Ok(None) => return (out, None),
                Ok(Some((p, n))) => {
                    out.push(p.to_vec());
                    at += n;
                }
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[test]
    fn test_varints_round_trip() {
        for v in [0, 1, 127, 128, 300, 1 << 35, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut b = &out[..];
            assert_eq!(get_varint(&mut b), Some(v));
            assert!(b.is_empty());
            assert_eq!(get_varint(&mut &out[..out.len() - 1]), None);
        }
        // With ten bytes or more at hand (a record's head, mid-frame) the
        // reader takes another path: the same values, the rest left.
        for v in [128, 300, 1 << 21, 1 << 35, 1 << 56, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            out.extend_from_slice(&[0xAB; 12]);
            let mut b = &out[..];
            assert_eq!(get_varint(&mut b), Some(v));
            assert_eq!(b, &[0xAB; 12]);
        }
        // Ten continuation bytes are no varint, however many follow.
        for extra in [0, 1, 5] {
            let mut out = vec![0x80; 10];
            out.extend(std::iter::repeat_n(0x01, extra));
            assert_eq!(get_varint(&mut &out[..]), None, "{extra} bytes after");
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX, -5] {
            let mut out = Vec::new();
            put_zigzag(&mut out, v);
            assert_eq!(get_zigzag(&mut &out[..]), Some(v));
        }
    }

    #[test]
    fn test_records_round_trip_through_frames() {
        let buf = sample();
        let (payloads, err) = frames(&buf);
        assert_eq!(err, None);
        assert_eq!(payloads.len(), 9);
        let recs: Vec<_> = payloads[4..]
            .iter()
            .map(|p| get_record(p).expect("record"))
            .collect();
        assert_eq!(recs[2].seq, 3);
        assert_eq!(recs[2].time, 3000);
        assert_eq!(get_json_body(recs[2].body), Some((r#"{"i":1}"#, "null")));
    }

    #[test]
    fn test_delta_heads_round_trip_and_a_dense_log_takes_one_byte_per_seq() {
        let heads = [
            (1u64, 1_000_000u64),
            (2, 1_000_700),
            (3, 999_000),
            (7, 5),
            (6, u64::MAX),
        ];
        for version in [2, VERSION_DELTA_HEADS] {
            let (mut put, mut get) = (HeadCoder::new(version), HeadCoder::new(version));
            let mut sizes = Vec::new();
            for &(seq, time) in &heads {
                let head = RecordHead {
                    seq,
                    time,
                    latency: 300,
                    from: 0,
                    to: 1,
                    kind: 2,
                    codec: CODEC_JSON,
                    body: b"xy",
                };
                let mut out = Vec::new();
                put.put(&mut out, &head);
                sizes.push(out.len());
                assert_eq!(get.get(&out), Some(head), "version {version}");
                // A record that does not decode leaves the state alone.
                let mut copy = get;
                assert_eq!(copy.get(&out[..2]), None);
                assert_eq!(copy, get);
            }
            if version == VERSION_DELTA_HEADS {
                // Tag, seq (1 byte), time (2: 700 ns on), latency (2),
                // three names, codec, body.
                assert_eq!(sizes[1], 1 + 1 + 2 + 2 + 3 + 1 + 2, "{sizes:?}");
            }
        }
    }

    #[test]
    fn test_a_short_frame_has_a_one_byte_length() {
        let mut out = Vec::new();
        put_frame_with(&mut out, |o| o.extend_from_slice(&[TAG_RECORD; 127]));
        assert_eq!(out.len(), 1 + 127 + 4);
        assert_eq!(out[0], 127);
        let mut out = Vec::new();
        put_frame_with(&mut out, |o| o.extend_from_slice(&[TAG_RECORD; 128]));
        assert_eq!(out.len(), 2 + 128 + 4);
        let (p, n) = take_frame(&out).expect("ok").expect("frame");
        assert_eq!((p.len(), n), (128, out.len()));
    }

    #[test]
    fn test_a_long_payload_gets_a_longer_length() {
        let mut out = Vec::new();
        let big = vec![7u8; 3 << 20];
        put_frame_with(&mut out, |o| {
            o.push(TAG_RECORD);
            o.extend_from_slice(&big);
        });
        let (p, n) = take_frame(&out).expect("ok").expect("frame");
        assert_eq!(n, out.len());
        assert_eq!(p.len(), big.len() + 1);
    }

    #[test]
    fn test_every_flipped_bit_is_corruption_or_truncation_never_a_record() {
        let buf = sample();
        let (good, _) = frames(&buf);
        let last_start = {
            let mut at = MAGIC.len();
            for _ in 0..good.len() - 1 {
                let (_, n) = take_frame(&buf[at..]).expect("ok").expect("frame");
                at += n;
            }
            at
        };
        for byte in last_start..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                let (got, err) = frames(&bad);
                // Everything before the damaged frame is read; the damaged
                // frame never is.
                assert_eq!(got[..], good[..good.len() - 1], "byte {byte} bit {bit}");
                assert!(err.is_some(), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn test_a_cut_at_every_offset_keeps_the_complete_prefix() {
        let buf = sample();
        let (good, _) = frames(&buf);
        let mut ends = Vec::new();
        let mut at = MAGIC.len();
        while let Some((_, n)) = take_frame(&buf[at..]).expect("ok") {
            at += n;
            ends.push(at);
        }
        for cut in MAGIC.len()..buf.len() {
            let (got, err) = frames(&buf[..cut]);
            let complete = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(got[..], good[..complete], "cut at {cut}");
            let at_boundary = cut == MAGIC.len() || ends.contains(&cut);
            match err {
                None => assert!(at_boundary, "cut at {cut}"),
                Some(FrameError::Truncated { .. }) => assert!(!at_boundary, "cut at {cut}"),
                Some(e) => panic!("cut at {cut}: {e:?}"),
            }
        }
    }
}
