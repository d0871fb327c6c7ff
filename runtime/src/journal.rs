// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The journal hook of the send path.
//!
//! Every message that goes through a [`Sender`](crate::Sender) is shown to the
//! runtime's journal (if one is installed) twice: once when it is sent
//! ([`Journal::sent`]) and once when its reply is sent ([`Journal::replied`]).
//! A message that an actor forwards to another actor without answering it
//! itself (the bus forwarding an access to a device) is recorded as a new send
//! that names the sequence number it continues, and only the final reply is
//! recorded. A one-way message ([`Runtime::notify`](crate::Runtime::notify):
//! an interrupt level, a device's input) is shown as sent and then answered
//! at once, with no reply (`()`).
//!
//! Payloads and replies are shown as [`Recordable`] so that a journal decides
//! whether, when and how to serialize them; without a journal nothing is
//! serialized and the hook costs one branch.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ids::{ActorId, Seq};
use crate::recording::{Body, DataMode, Entry, RecordKind};

/// A value a journal can turn into JSON. Implemented for every `Serialize` type.
pub trait Recordable {
    /// The value as JSON.
    fn to_json(&self) -> serde_json::Value;
}

impl<T: Serialize + ?Sized> Recordable for T {
    fn to_json(&self) -> serde_json::Value {
        // A payload that cannot be represented is recorded as such rather than
        // aborting the run: the journal is a debugging aid, not a data path.
        serde_json::to_value(self)
            .unwrap_or_else(|e| serde_json::Value::String(format!("<unserializable: {e}>")))
    }
}

/// A message as it leaves the send path.
pub struct Sent<'a> {
    /// Its sequence number.
    pub seq: Seq,
    /// The sequence number of the message this one continues, when an actor
    /// forwarded a request instead of answering it.
    pub forwarded_from: Option<Seq>,
    /// The sending actor.
    pub from: &'a ActorId,
    /// The receiving actor.
    pub to: &'a ActorId,
    /// The message type, such as `read` or `write`.
    pub kind: &'static str,
    /// The message itself.
    pub payload: &'a dyn Recordable,
}

impl std::fmt::Debug for Sent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sent")
            .field("seq", &self.seq)
            .field("forwarded_from", &self.forwarded_from)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A reply as it is sent back.
pub struct Replied<'a> {
    /// The sequence number of the message being answered.
    pub seq: Seq,
    /// The reply, including a refusal (`Gone`, `Draining`, ...).
    pub reply: &'a dyn Recordable,
}

impl std::fmt::Debug for Replied<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replied")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// Receives every send and every reply of a [`Runtime`](crate::Runtime).
///
/// Called on the sending and replying threads, inside the data path: an
/// implementation must not block for long (hand the record to a writer thread
/// through a bounded buffer).
pub trait Journal: Send + Sync + 'static {
    /// A message was sent.
    fn sent(&self, record: &Sent<'_>);
    /// A reply was sent.
    fn replied(&self, record: &Replied<'_>);
    /// A record made whole by its source: a virtqueue request with
    /// everything its handler exchanged with the world, a vhost-user
    /// protocol message, a device added or removed. The default drops it:
    /// only a journal that writes a log wants these.
    fn record(&self, _entry: Entry) {}
    /// As [`Journal::record`], with the body borrowed: a binary log
    /// encodes it at once, on this thread, so nothing is boxed. The
    /// default drops it.
    fn record_body(
        &self,
        _time: u64,
        _latency: u64,
        _from: &str,
        _to: &str,
        _kind: RecordKind,
        _body: &dyn Body,
    ) {
    }
    /// The time for [`Entry::time`]: ns since the journal began.
    fn now(&self) -> u64 {
        0
    }
    /// How a source should capture guest data for [`Journal::record`], or
    /// `None` if this journal takes no such records (so a source skips
    /// building them).
    fn data_mode(&self) -> Option<DataMode> {
        None
    }
    /// How far a record goes in this journal's recorder (test only:
    /// [`RecordOptions::until`](crate::recording::RecordOptions::until)).
    fn record_until(&self) -> crate::recording::Until {
        crate::recording::Until::Whole
    }
}

/// One record kept by [`MemoryJournal`].
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum JournalRecord {
    /// A send.
    Sent {
        /// Sequence number.
        seq: Seq,
        /// Sequence number this one continues, if forwarded.
        forwarded_from: Option<Seq>,
        /// Time since the journal was created.
        time: Duration,
        /// Sender.
        from: ActorId,
        /// Receiver.
        to: ActorId,
        /// Message type.
        kind: String,
        /// Message payload.
        payload: serde_json::Value,
    },
    /// A reply.
    Replied {
        /// Sequence number answered.
        seq: Seq,
        /// Time since the journal was created.
        time: Duration,
        /// The reply.
        reply: serde_json::Value,
    },
}

/// A journal that keeps every record in memory, in the order the hook saw them.
#[derive(Debug)]
pub struct MemoryJournal {
    start: Instant,
    records: Mutex<Vec<JournalRecord>>,
}

impl Default for MemoryJournal {
    fn default() -> Self {
        MemoryJournal {
            start: Instant::now(),
            records: Mutex::new(Vec::new()),
        }
    }
}

impl MemoryJournal {
    /// An empty journal.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the records so far.
    pub fn records(&self) -> Vec<JournalRecord> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<JournalRecord>> {
        // A panic while holding this lock can only come from an allocation
        // failure inside `push`; the records are still well formed.
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Journal for MemoryJournal {
    fn sent(&self, r: &Sent<'_>) {
        let rec = JournalRecord::Sent {
            seq: r.seq,
            forwarded_from: r.forwarded_from,
            time: self.start.elapsed(),
            from: r.from.clone(),
            to: r.to.clone(),
            kind: r.kind.to_string(),
            payload: r.payload.to_json(),
        };
        self.lock().push(rec);
    }

    fn replied(&self, r: &Replied<'_>) {
        let rec = JournalRecord::Replied {
            seq: r.seq,
            time: self.start.elapsed(),
            reply: r.reply.to_json(),
        };
        self.lock().push(rec);
    }
}

/// The one writer of a message log: every record reaches its
/// [`Recorder`](crate::recording::Recorder) through this journal, whether
/// it came through the send path or was made whole by its source
/// ([`Journal::record`]). It writes every answered message: one
/// record per message, written when its reply is sent, with the payload
/// and the reply. A message an actor forwarded (the bus passing an access
/// on to a device) is recorded as answered by the forward, whose reply
/// names the receiving actor and its runtime sequence number.
pub struct RecordJournal {
    recorder: crate::recording::Recorder,
    pending: Mutex<std::collections::HashMap<u64, Pending>>,
}

struct Pending {
    time: u64,
    from: std::sync::Arc<str>,
    to: std::sync::Arc<str>,
    kind: &'static str,
    payload: serde_json::Value,
}

impl std::fmt::Debug for RecordJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordJournal")
            .field("recorder", &self.recorder)
            .finish_non_exhaustive()
    }
}

impl RecordJournal {
    /// A journal writing to `recorder`.
    pub fn new(recorder: crate::recording::Recorder) -> Self {
        RecordJournal {
            recorder,
            pending: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Pending>> {
        // The map stays consistent even if a holder panicked: every
        // operation on it is a single insert or remove.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, p: Pending, reply: serde_json::Value) {
        let now = self.recorder.now();
        self.recorder.record(Entry::json(
            p.time,
            now.saturating_sub(p.time),
            p.from,
            p.to,
            RecordKind::Message(p.kind),
            p.payload,
            reply,
        ));
    }
}

/// An actor's id as a log names it: a device's or bus's own id, without
/// the runtime's `dev:` or `bus:` prefix, as in topologies and the `added`
/// records.
fn log_name(id: &ActorId) -> &str {
    let s = id.as_str();
    s.strip_prefix("dev:")
        .or_else(|| s.strip_prefix("bus:"))
        .unwrap_or(s)
}

impl Journal for RecordJournal {
    fn sent(&self, r: &Sent<'_>) {
        let pending = Pending {
            time: self.recorder.now(),
            from: std::sync::Arc::from(log_name(r.from)),
            to: std::sync::Arc::from(log_name(r.to)),
            kind: r.kind,
            payload: r.payload.to_json(),
        };
        let forwarded = {
            let mut map = self.lock();
            map.insert(r.seq.0, pending);
            r.forwarded_from.and_then(|f| map.remove(&f.0))
        };
        if let Some(original) = forwarded {
            let reply = serde_json::json!({ "forwarded": { "to": log_name(r.to), "as": r.seq.0 } });
            self.emit(original, reply);
        }
    }

    fn replied(&self, r: &Replied<'_>) {
        let pending = self.lock().remove(&r.seq.0);
        if let Some(p) = pending {
            self.emit(p, r.reply.to_json());
        }
    }

    fn record(&self, entry: Entry) {
        self.recorder.record(entry);
    }

    fn record_body(
        &self,
        time: u64,
        latency: u64,
        from: &str,
        to: &str,
        kind: RecordKind,
        body: &dyn Body,
    ) {
        self.recorder
            .record_body(time, latency, from, to, kind, body);
    }

    fn now(&self) -> u64 {
        self.recorder.now()
    }

    fn data_mode(&self) -> Option<DataMode> {
        Some(self.recorder.data_mode())
    }

    fn record_until(&self) -> crate::recording::Until {
        self.recorder.until()
    }
}
