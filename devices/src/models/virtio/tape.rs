// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A replayed request's tape: what the recording says the request read and
//! took in, and what the device did with it in replay.
//!
//! [`ReplayTape`] is reusable: replay hands one to
//! [`Request::replay_on`](super::Request::replay_on), takes it back with
//! [`Request::take_tape`](super::Request::take_tape) once the device has
//! answered, compares, and hands it to the next request. Its vectors, the
//! byte buffers of small data and the stand-in map keep their capacity, so
//! that once they have grown, replaying a request allocates nothing here.

use switchboard_runtime::recording::{hash, Data, DataMode, INLINE_MAX};

use super::{Segment, Trace};

/// The reusable state of replayed requests (see the module docs).
pub struct ReplayTape {
    pub(super) r: Box<Replaying>,
    /// The segments vector, kept between requests.
    pub(super) segs: Vec<Segment>,
}

impl std::fmt::Debug for ReplayTape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayTape")
            .field("kind", &self.r.kind)
            .field("expected", &self.r.expected)
            .field("actual", &self.r.actual)
            .field("divergence", &self.r.divergence)
            .finish()
    }
}

impl ReplayTape {
    /// An empty tape for requests recorded in `mode`.
    pub fn new(mode: DataMode) -> Self {
        ReplayTape {
            r: Box::new(Replaying::new(mode, Trace::default())),
            segs: Vec::new(),
        }
    }

    /// The recording the next request replays: fill it in before
    /// [`Request::replay_on`](super::Request::replay_on). Only the reads,
    /// the inputs and the outcome (`errno`) of each effect are used; the
    /// rest is left for the caller to compare with [`ReplayTape::actual`].
    pub fn expected_mut(&mut self) -> &mut Trace {
        &mut self.r.expected
    }

    /// The recording the last request replayed.
    pub fn expected(&self) -> &Trace {
        &self.r.expected
    }

    /// What the last request did: its guest-memory writes and effects.
    pub fn actual(&self) -> &Trace {
        &self.r.actual
    }

    /// The message type the device gave the last request.
    pub fn kind(&self) -> &'static str {
        self.r.kind
    }

    /// The first place the last request asked for something the recording
    /// does not have.
    pub fn divergence(&self) -> Option<&str> {
        self.r.divergence.as_deref()
    }

    /// Makes ready for the next request: what the last one did is
    /// forgotten (its buffers kept), the expected trace is kept.
    pub(super) fn rewind(&mut self) {
        let r = &mut self.r;
        r.kind = "request";
        r.next_read = 0;
        r.next_input = 0;
        r.next_effect = 0;
        r.divergence = None;
        r.fills.clear();
        let spare = &mut r.spare;
        for a in r.actual.writes.drain(..) {
            if let Data::Bytes(b) = a.data {
                spare.push(b);
            }
        }
        for e in r.actual.effects.drain(..) {
            if let Some(Data::Bytes(b)) = e.data {
                spare.push(b);
            }
        }
        r.actual.reads.clear();
        r.actual.inputs.clear();
    }
}

pub(super) struct Replaying {
    pub(super) mode: DataMode,
    pub(super) kind: &'static str,
    pub(super) expected: Trace,
    pub(super) next_read: usize,
    pub(super) next_input: usize,
    pub(super) next_effect: usize,
    pub(super) actual: Trace,
    /// The recorded hash and length of each stand-in handed out for
    /// hashed data: so that data copied through unchanged compares equal.
    pub(super) fills: Vec<(u128, u64)>,
    pub(super) divergence: Option<String>,
    /// Byte buffers of small data the device wrote in earlier requests,
    /// for [`Replaying::capture`] to reuse.
    spare: Vec<Vec<u8>>,
}

impl Replaying {
    pub(super) fn new(mode: DataMode, expected: Trace) -> Self {
        Replaying {
            mode,
            kind: "request",
            expected,
            next_read: 0,
            next_input: 0,
            next_effect: 0,
            actual: Trace::default(),
            fills: Vec::new(),
            divergence: None,
            spare: Vec::new(),
        }
    }

    pub(super) fn diverge(&mut self, why: String) {
        if self.divergence.is_none() {
            self.divergence = Some(why);
        }
    }

    /// Fills `buf` with the recorded `data`: its bytes, or for hashed data
    /// stand-in bytes (the hash's 16 bytes, repeated), remembered so that
    /// a copy of them is recognised by [`Replaying::capture`] and compares
    /// equal to the recorded hash.
    pub(super) fn fill(fills: &mut Vec<(u128, u64)>, data: &Data, buf: &mut [u8]) {
        match data {
            Data::Bytes(b) => buf.copy_from_slice(b),
            Data::Hash { hash: h, .. } => {
                let pattern = h.to_le_bytes();
                let n = buf.len().min(pattern.len());
                buf[..n].copy_from_slice(&pattern[..n]);
                // Doubling: a few large copies instead of one per 16 bytes.
                let mut filled = n;
                while filled < buf.len() {
                    let m = filled.min(buf.len() - filled);
                    buf.copy_within(..m, filled);
                    filled += m;
                }
                fills.push((*h, buf.len() as u64));
            }
        }
    }

    /// Whether `bytes` are the stand-in [`Replaying::fill`] makes for
    /// hash `h`: they start with its 16 bytes and repeat every 16 bytes.
    fn is_stand_in(h: u128, bytes: &[u8]) -> bool {
        let pattern = h.to_le_bytes();
        let n = bytes.len().min(pattern.len());
        bytes[..n] == pattern[..n] && bytes[n..] == bytes[..bytes.len() - n]
    }

    /// `bytes` as the recording would hold them. Stand-in bytes (which
    /// exist only for hashed data, never small) are recognised as such and
    /// given the recorded hash they stand for, without hashing them.
    pub(super) fn capture(&mut self, bytes: &[u8]) -> Data {
        if self.mode == DataMode::Value || bytes.len() <= INLINE_MAX {
            return Data::Bytes(copy_into_spare(&mut self.spare, bytes));
        }
        let len = bytes.len() as u64;
        let recorded = self
            .fills
            .iter()
            .find(|&&(h, l)| l == len && Self::is_stand_in(h, bytes));
        Data::Hash {
            len,
            hash: recorded.map_or_else(|| hash(bytes), |&(h, _)| h),
        }
    }
}

/// `bytes` in a buffer from `spare` (a new one when it is empty): how
/// recording, replay and decoding hold small data without allocating
/// once their buffers have grown.
pub(crate) fn copy_into_spare(spare: &mut Vec<Vec<u8>>, bytes: &[u8]) -> Vec<u8> {
    let mut b = spare.pop().unwrap_or_default();
    b.clear();
    b.extend_from_slice(bytes);
    b
}

/// A virtio request record decoded in place, for replay (the binary
/// log's codec 1, `vhost_user/codec.rs`): every vector (and the
/// byte buffer of each small datum) is reused from one record to the
/// next, and bytes are copied out of the body only into buffers that have
/// already grown, so that decoding allocates nothing once they have.
#[derive(Default)]
pub(crate) struct DecodedRequest {
    pub(crate) queue: u16,
    pub(crate) head: u16,
    pub(crate) readable: Vec<u32>,
    pub(crate) writable: Vec<u32>,
    /// The reads, inputs, writes and effects.
    pub(crate) trace: Trace,
    /// The reply's length.
    pub(crate) len: u32,
    /// Where each DATA of the record so far is, for `DATA 0x02`.
    pub(crate) seen: Vec<SeenData>,
    /// Byte buffers of small data dropped from the vectors, for reuse.
    pub(crate) spare: Vec<Vec<u8>>,
}

/// A DATA already read: hashed, or the bytes at `start..end` of the body.
#[derive(Clone, Copy)]
pub(crate) enum SeenData {
    Hash {
        len: u64,
        hash: u128,
    },
    Bytes {
        start: usize,
        end: usize,
    },
    /// Compressed (`DATA 0x03`): `len` bytes once decompressed.
    Zstd {
        start: usize,
        end: usize,
        len: u64,
    },
}
