// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Replaying a virtio device: each recorded request is rebuilt
//! ([`Request::replay_on`]) on one reused [`ReplayTape`], handed to the
//! device, and what the device wrote and did is compared with the record.
//! A request record comes parsed from a JSON line, or decoded in place
//! from the binary form ([`DecodedRequest`]); either way the same
//! comparison runs, so a divergence reads the same in both forms.

use std::fmt::Write as _;

use switchboard_runtime::recording::{Data, DataMode, ParsedKind, RecordKind};

use super::{Mismatch, Msg, MsgBody, Replayer};
use crate::models::virtio::{
    At, Completer, DecodedRequest, External, Handled, ReplayTape, Request, VirtioDevice,
};
use crate::vhost_user::{RequestPayload, RequestReply};

/// A virtio device under replay.
pub(super) struct VirtioReplayer<D: VirtioDevice> {
    device: D,
    mode: DataMode,
    completer: Completer,
    done: crossbeam_channel::Receiver<(Request, u32)>,
    /// The tape every request is replayed on; `None` only while a request
    /// holds it (or after a device kept one and never answered it).
    tape: Option<ReplayTape>,
}

/// A request as a record holds it, besides its expected trace (which is
/// already on the tape).
struct Chain<'a> {
    queue: u16,
    head: u16,
    readable: &'a [u32],
    writable: &'a [u32],
    /// The reply's length.
    len: u32,
}

impl<D: VirtioDevice> VirtioReplayer<D> {
    pub(super) fn new(device: D, mode: DataMode) -> Self {
        let (tx, done) = crossbeam_channel::unbounded();
        let completer = Completer::new(move |request, len| {
            let _ = tx.send((request, len));
        });
        VirtioReplayer {
            device,
            mode,
            completer,
            done,
            tape: Some(ReplayTape::new(mode)),
        }
    }

    fn tape(&mut self) -> &mut ReplayTape {
        let mode = self.mode;
        self.tape.get_or_insert_with(|| ReplayTape::new(mode))
    }

    /// A request parsed from a JSON line.
    fn request(
        &mut self,
        kind: &str,
        payload: RequestPayload,
        reply: RequestReply,
    ) -> Result<(), Mismatch> {
        let e = self.tape().expected_mut();
        e.reads = payload.reads;
        e.inputs = payload.inputs;
        e.writes = reply.writes;
        e.effects = reply.effects;
        let chain = Chain {
            queue: payload.queue,
            head: payload.head,
            readable: &payload.readable,
            writable: &payload.writable,
            len: reply.len,
        };
        self.run(kind, &chain)
    }

    /// A request decoded from the binary form. Its trace and the tape's
    /// swap places, so both keep their buffers.
    fn decoded(&mut self, kind: &str, d: &mut DecodedRequest) -> Result<(), Mismatch> {
        std::mem::swap(self.tape().expected_mut(), &mut d.trace);
        let chain = Chain {
            queue: d.queue,
            head: d.head,
            readable: &d.readable,
            writable: &d.writable,
            len: d.len,
        };
        self.run(kind, &chain)
    }

    /// Replays the request whose recording is on the tape.
    fn run(&mut self, kind: &str, c: &Chain<'_>) -> Result<(), Mismatch> {
        if usize::from(c.queue) >= self.device.num_queues() {
            return Err(Mismatch::new(
                "the request's queue does not exist on the rebuilt device",
                format!("queue < {}", self.device.num_queues()),
                format!("queue {}", c.queue),
            ));
        }
        let tape = self
            .tape
            .take()
            .unwrap_or_else(|| ReplayTape::new(self.mode));
        let request = Request::replay_on(c.queue, c.head, c.readable, c.writable, tape);
        let (mut request, len) = match self.device.handle(request, &self.completer) {
            Handled::Done { request, len } => (request, len),
            Handled::Pending => {
                self.device.end_batch(c.queue);
                match self.done.try_recv() {
                    Ok(done) => done,
                    Err(_) => {
                        return Err(Mismatch::new(
                            "the device did not answer the request",
                            format!("an answer of {} bytes", c.len),
                            "no answer",
                        ))
                    }
                }
            }
        };
        let Some(tape) = request.take_tape() else {
            return Err(Mismatch::new(
                "the device answered another request",
                "this request",
                "another",
            ));
        };
        let result = compare(kind, &tape, c.len, len);
        self.tape = Some(tape);
        result
    }

    fn config(&self, payload: &str, reply: &str) -> Result<(), Mismatch> {
        #[derive(serde::Deserialize)]
        struct Ask {
            offset: u32,
            size: u32,
        }
        #[derive(serde::Deserialize)]
        struct Got {
            data: Data,
        }
        let ask: Ask = serde_json::from_str(payload).map_err(|e| {
            Mismatch::new("bad GET_CONFIG payload", "offset and size", e.to_string())
        })?;
        let got: Got = serde_json::from_str(reply)
            .map_err(|e| Mismatch::new("bad GET_CONFIG reply", "data", e.to_string()))?;
        let actual = Data::Bytes(crate::models::virtio::config_window(
            &self.device.config(),
            ask.offset,
            ask.size,
        ));
        if !actual.same(&got.data) {
            return Err(Mismatch::new(
                format!(
                    "config space at {:#x}: {}",
                    ask.offset,
                    first_difference(&got.data, &actual)
                ),
                show(&got.data),
                show(&actual),
            ));
        }
        Ok(())
    }
}

/// What a replayed request did (on `tape`, with used length `len`)
/// against its record (`kind`, the tape's expected trace, `recorded_len`).
fn compare(kind: &str, tape: &ReplayTape, recorded_len: u32, len: u32) -> Result<(), Mismatch> {
    if let Some(why) = tape.divergence() {
        return Err(Mismatch::new(
            why,
            "what the recording holds",
            "the device asked for something else",
        ));
    }
    if tape.kind() != kind {
        return Err(Mismatch::new("message type", kind.to_string(), tape.kind()));
    }
    let (expected, actual) = (tape.expected(), tape.actual());
    compare_ats("guest-memory write", &expected.writes, &actual.writes)?;
    compare_externals(&expected.effects, &actual.effects)?;
    if len != recorded_len {
        return Err(Mismatch::new(
            "used length (bytes written into the request's buffers)",
            recorded_len.to_string(),
            len.to_string(),
        ));
    }
    Ok(())
}

impl<D: VirtioDevice> Replayer for VirtioReplayer<D> {
    fn replay(&mut self, msg: Msg<'_>, compare: bool) -> Result<(), Mismatch> {
        let kind = msg.kind;
        use RecordKind as K;
        match (msg.parsed, msg.body) {
            (_, MsgBody::Request(payload, reply)) if compare => self.request(kind, payload, reply),
            (_, MsgBody::Decoded(d)) if compare => self.decoded(kind, d),
            (_, MsgBody::Request(..) | MsgBody::Decoded(_)) => Ok(()),
            (ParsedKind::Known(K::ResetDevice), _) => {
                self.device.reset();
                Ok(())
            }
            (ParsedKind::Known(K::GetConfig), body) if compare => {
                let (payload, reply) = body.raw();
                self.config(payload, reply)
            }
            // The rest of the protocol changes nothing replay rebuilds.
            (ParsedKind::Known(k), _) if !k.is_message() => Ok(()),
            (_, body) if compare => {
                // A request whose line was parsed in full (an id with an
                // escape in it, say).
                let (payload, reply) = body.raw();
                let payload = serde_json::from_str(payload).map_err(|e| {
                    Mismatch::new("the payload is not a request's", "a request", e.to_string())
                })?;
                let reply = serde_json::from_str(reply).map_err(|e| {
                    Mismatch::new("the reply is not a request's", "a reply", e.to_string())
                })?;
                self.request(kind, payload, reply)
            }
            (_, MsgBody::Raw { .. }) => Ok(()),
        }
    }

    fn stateful(&self) -> bool {
        false
    }

    fn takes_requests(&self) -> bool {
        true
    }
}

/// A short form of recorded data.
fn show(d: &Data) -> String {
    match d {
        Data::Bytes(b) if b.len() <= 32 => {
            let mut s = String::new();
            for x in b {
                let _ = write!(s, "{x:02x}");
            }
            format!("{} bytes: {}", b.len(), if s.is_empty() { "-" } else { &s })
        }
        Data::Bytes(b) => format!("{} bytes, xxh3 {:032x}", b.len(), d.content_hash()),
        Data::Hash { len, hash } => format!("{len} bytes, xxh3 {hash:032x}"),
    }
}

/// Where two data differ, when both hold bytes.
fn first_difference(expected: &Data, actual: &Data) -> String {
    match (expected, actual) {
        (Data::Bytes(a), Data::Bytes(b)) => {
            match a.iter().zip(b.iter()).position(|(x, y)| x != y) {
                Some(i) => format!(
                    "byte {i} differs: expected {:#04x}, got {:#04x}",
                    a[i], b[i]
                ),
                None => format!("length differs: expected {}, got {}", a.len(), b.len()),
            }
        }
        _ => "content differs (hashes)".to_string(),
    }
}

fn compare_ats(what: &str, expected: &[At], actual: &[At]) -> Result<(), Mismatch> {
    for (i, (e, a)) in expected.iter().zip(actual).enumerate() {
        if e.at != a.at || !e.data.same(&a.data) {
            let detail = if e.at != a.at {
                format!("at +{:#x} instead of +{:#x}", a.at, e.at)
            } else {
                first_difference(&e.data, &a.data)
            };
            return Err(Mismatch::new(
                format!("{what} {i} at +{:#x}: {detail}", e.at),
                show(&e.data),
                show(&a.data),
            ));
        }
    }
    if expected.len() != actual.len() {
        return Err(Mismatch::new(
            format!("number of {what}s"),
            expected.len().to_string(),
            actual.len().to_string(),
        ));
    }
    Ok(())
}

fn describe(e: &External) -> String {
    let mut s = format!("{} at {:#x}, {} bytes", e.what, e.at, e.len);
    if let Some(d) = &e.data {
        let _ = write!(s, ", data {}", show(d));
    }
    if let Some(errno) = e.errno {
        let _ = write!(s, ", failed with errno {errno}");
    }
    s
}

fn compare_externals(expected: &[External], actual: &[External]) -> Result<(), Mismatch> {
    for (i, (e, a)) in expected.iter().zip(actual).enumerate() {
        let same_data = match (&e.data, &a.data) {
            (None, None) => true,
            (Some(x), Some(y)) => x.same(y),
            _ => false,
        };
        if e.what != a.what || e.at != a.at || e.len != a.len || !same_data {
            let detail = match (&e.data, &a.data) {
                (Some(x), Some(y)) if e.what == a.what && e.at == a.at => {
                    format!(": {}", first_difference(x, y))
                }
                _ => String::new(),
            };
            return Err(Mismatch::new(
                format!("effect {i} on the outside{detail}"),
                describe(e),
                describe(a),
            ));
        }
    }
    if expected.len() != actual.len() {
        return Err(Mismatch::new(
            "number of effects on the outside (file writes, flushes, ...)",
            expected.len().to_string(),
            actual.len().to_string(),
        ));
    }
    Ok(())
}
