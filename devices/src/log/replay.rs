// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Replaying a message log: every recorded actor is rebuilt from the log
//! header (or from its `added` record) and fed its recorded messages in
//! order; each reply, guest-memory write and effect on the outside is
//! compared with the recorded one. The first difference stops the replay
//! and is reported with the message and the last messages that actor
//! handled before it.
//!
//! A virtio device is rebuilt without its backing (no image file, no
//! entropy source, no guest): its reads of guest memory, file contents and
//! entropy come from the recording, through the same [`Request`] methods
//! the live device uses, and its writes are collected instead of done.
//!
//! A device on a bus (the UART, the test device) is rebuilt without its
//! sink or timers and fed its accesses and inputs in log order; its
//! replies and its interrupt messages are compared (see `mmio.rs`). Its
//! state depends on every record before, so after a `gap` record it is no
//! longer replayed.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use switchboard_runtime::recording::{
    ActorInfo, Data, DataMode, LogError, LogReader, ParsedKind, RecordKind,
};

use crate::models::blk::{Blk, BlkRebuild};
use crate::models::rng::{Rng, RngRebuild};
use crate::models::virtio::{At, Completer, External, Handled, Request, Trace, VirtioDevice};
use crate::models::DeviceKind;
use crate::vhost_user::{RequestPayload, RequestReply};

mod mmio;

/// How many earlier messages of the diverging actor a report shows.
pub const HISTORY: usize = 5;

/// What to replay.
#[derive(Clone, Debug, Default)]
pub struct ReplayOptions {
    /// Only this actor.
    pub device: Option<String>,
    /// Compare from this sequence number on (earlier messages that change
    /// an actor's state are still applied).
    pub from: Option<u64>,
    /// Stop after this sequence number.
    pub until: Option<u64>,
    /// Show a progress bar on stderr (only drawn on a terminal).
    pub progress: bool,
}

/// A replay that matched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Messages replayed and compared, per actor.
    pub per_actor: BTreeMap<String, u64>,
    /// Records read.
    pub records: u64,
    /// Records outside `--device`/`--from`/`--until`.
    pub skipped: u64,
    /// Records to actors that cannot be replayed, per actor, with why.
    pub not_replayable: BTreeMap<String, (u64, String)>,
    /// Gap records, and the records they stand for.
    pub gaps: u64,
    /// Records lost in gaps.
    pub dropped: u64,
}

impl ReplayReport {
    /// Messages replayed in all.
    pub fn replayed(&self) -> u64 {
        self.per_actor.values().sum()
    }
}

/// The first message whose replay differs from its recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    /// Its sequence number.
    pub seq: u64,
    /// Its line in the log.
    pub line: u64,
    /// The actor.
    pub actor: String,
    /// The message type.
    pub kind: String,
    /// The message as recorded (abbreviated).
    pub message: String,
    /// What differs.
    pub what: String,
    /// The recorded value.
    pub expected: String,
    /// The replayed value.
    pub actual: String,
    /// The actor's previous messages: `(seq, type, abbreviated line)`.
    pub history: Vec<(u64, String, String)>,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // An interrupt message is one the actor sent.
        let direction = if self.kind == mmio::IRQ { "from" } else { "to" };
        writeln!(
            f,
            "divergence at seq {} (line {}): {} message {direction} {}",
            self.seq, self.line, self.kind, self.actor
        )?;
        writeln!(f, "  {}", self.what)?;
        writeln!(f, "  expected: {}", self.expected)?;
        writeln!(f, "  actual:   {}", self.actual)?;
        writeln!(f, "  message:  {}", self.message)?;
        if self.history.is_empty() {
            writeln!(f, "  {} handled no message before it", self.actor)?;
        } else {
            writeln!(
                f,
                "  the last {} messages {} handled before it:",
                self.history.len(),
                self.actor
            )?;
            for (seq, kind, line) in &self.history {
                writeln!(f, "    seq {seq} {kind}: {line}")?;
            }
        }
        Ok(())
    }
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A reply or write differs.
    #[error("{0}")]
    Diverged(Box<Divergence>),
    /// The log cannot be read (further). `replayed` matched before it.
    #[error("{error}")]
    Log {
        /// Why.
        #[source]
        error: LogError,
        /// What matched before the error.
        replayed: Box<ReplayReport>,
    },
    /// An actor cannot be rebuilt from the log.
    #[error("{path}: {what}")]
    Rebuild {
        /// The log.
        path: String,
        /// What is wrong.
        what: String,
    },
}

/// How a replayed message differs.
#[derive(Debug)]
struct Mismatch {
    what: String,
    expected: String,
    actual: String,
    /// The record the divergence is at, when it is an earlier one than the
    /// record being replayed (an interrupt message recorded before the
    /// record that caused it).
    earlier: Option<Box<Earlier>>,
}

/// A record a divergence is found at after it was read.
#[derive(Debug)]
struct Earlier {
    seq: u64,
    line: u64,
    kind: &'static str,
    /// The record, abbreviated.
    message: String,
}

impl Mismatch {
    fn new(
        what: impl Into<String>,
        expected: impl Into<String>,
        actual: impl Into<String>,
    ) -> Self {
        Mismatch {
            what: what.into(),
            expected: expected.into(),
            actual: actual.into(),
            earlier: None,
        }
    }

    /// The same mismatch, at an earlier record.
    fn at(self, earlier: Earlier) -> Self {
        Mismatch {
            earlier: Some(Box::new(earlier)),
            ..self
        }
    }
}

/// Whether records of type `kind` are the log's or the connection's own
/// (a device added, a protocol message), not messages a device handled.
fn is_protocol(kind: &str) -> bool {
    matches!(RecordKind::parse(kind), ParsedKind::Known(k) if !k.is_message())
}

/// The `type` of a record line, found without parsing it: the writer puts
/// `type` before `payload`, and a `","type":"` inside a JSON string would
/// have its quotes escaped, so the first match is the field.
fn peek_type(line: &str) -> Option<&str> {
    static KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new("\",\"type\":\""));
    peek(line, &KEY)
}

/// The `to` of a record line, found the same way; `None` if it holds an
/// escape (then the line is parsed in full).
fn peek_to(line: &str) -> Option<&str> {
    static KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new("\",\"to\":\""));
    peek(line, &KEY).filter(|to| !to.contains('\\'))
}

fn peek<'a>(line: &'a str, key: &memchr::memmem::Finder<'_>) -> Option<&'a str> {
    let start = key.find(line.as_bytes())? + key.needle().len();
    let len = memchr::memchr(b'"', &line.as_bytes()[start..])?;
    line.get(start..start + len)
}

/// A virtio request record, parsed in one pass.
#[derive(serde::Deserialize)]
struct RequestLine<'a> {
    seq: u64,
    #[serde(borrow)]
    to: std::borrow::Cow<'a, str>,
    payload: RequestPayload,
    reply: RequestReply,
}

/// A record as a replayer gets it.
struct Msg<'a> {
    seq: u64,
    /// Its line in the log.
    line: u64,
    kind: &'a str,
    /// The whole line.
    text: &'a str,
    body: MsgBody<'a>,
}

enum MsgBody<'a> {
    /// A virtio request, already parsed.
    Request(RequestPayload, RequestReply),
    /// Anything else, payload and reply unparsed.
    Raw {
        payload: &'a RawValue,
        reply: &'a RawValue,
    },
}

impl MsgBody<'_> {
    fn raw(&self) -> (&str, &str) {
        match self {
            MsgBody::Raw { payload, reply } => (payload.get(), reply.get()),
            MsgBody::Request(..) => ("null", "null"),
        }
    }
}

/// An actor rebuilt for replay.
trait Replayer {
    /// Replays one recorded message. `compare` false: apply it (for the
    /// actor's state) without comparing.
    fn replay(&mut self, msg: Msg<'_>, compare: bool) -> Result<(), Mismatch>;
    /// The actor was removed (`removed` record): it drains and stops.
    /// `compare` as for [`Replayer::replay`].
    fn removed(&mut self, _msg: Msg<'_>, _compare: bool) -> Result<(), Mismatch> {
        Ok(())
    }
    /// The log ended: anything recorded and not yet checked is a
    /// divergence.
    fn finish(&mut self) -> Result<(), Mismatch> {
        Ok(())
    }
    /// Whether messages can change its state (then messages before
    /// `--from` are still applied, and a gap in the log ends its replay).
    fn stateful(&self) -> bool;
    /// Whether it takes virtio requests (whose records are parsed in one
    /// pass).
    fn takes_requests(&self) -> bool {
        false
    }
}

/// A virtio device under replay.
struct VirtioReplayer<D: VirtioDevice> {
    device: D,
    mode: DataMode,
    completer: Completer,
    done: crossbeam_channel::Receiver<(Request, u32)>,
}

impl<D: VirtioDevice> VirtioReplayer<D> {
    fn new(device: D, mode: DataMode) -> Self {
        let (tx, done) = crossbeam_channel::unbounded();
        let completer = Completer::new(move |request, len| {
            let _ = tx.send((request, len));
        });
        VirtioReplayer {
            device,
            mode,
            completer,
            done,
        }
    }

    fn request(
        &mut self,
        kind: &str,
        payload: RequestPayload,
        reply: RequestReply,
    ) -> Result<(), Mismatch> {
        if usize::from(payload.queue) >= self.device.num_queues() {
            return Err(Mismatch::new(
                "the request's queue does not exist on the rebuilt device",
                format!("queue < {}", self.device.num_queues()),
                format!("queue {}", payload.queue),
            ));
        }
        let expected = Trace {
            reads: payload.reads,
            inputs: payload.inputs,
            writes: Vec::new(),
            // Only the recorded outcome (errno) of each effect is used.
            effects: reply
                .effects
                .iter()
                .map(|e| External {
                    what: String::new(),
                    at: 0,
                    len: 0,
                    data: None,
                    errno: e.errno,
                })
                .collect(),
        };
        let request = Request::replay(
            payload.queue,
            payload.head,
            &payload.readable,
            &payload.writable,
            expected,
            self.mode,
        );
        let (mut request, len) = match self.device.handle(request, &self.completer) {
            Handled::Done { request, len } => (request, len),
            Handled::Pending => {
                self.device.end_batch(payload.queue);
                match self.done.try_recv() {
                    Ok(done) => done,
                    Err(_) => {
                        return Err(Mismatch::new(
                            "the device did not answer the request",
                            format!("an answer of {} bytes", reply.len),
                            "no answer",
                        ))
                    }
                }
            }
        };
        let Some(got) = request.replayed() else {
            return Err(Mismatch::new(
                "the device answered another request",
                "this request",
                "another",
            ));
        };
        if let Some(why) = got.divergence {
            return Err(Mismatch::new(
                why,
                "what the recording holds",
                "the device asked for something else",
            ));
        }
        if got.kind != kind {
            return Err(Mismatch::new("message type", kind.to_string(), got.kind));
        }
        compare_ats("guest-memory write", &reply.writes, &got.trace.writes)?;
        compare_externals(&reply.effects, &got.trace.effects)?;
        if len != reply.len {
            return Err(Mismatch::new(
                "used length (bytes written into the request's buffers)",
                reply.len.to_string(),
                len.to_string(),
            ));
        }
        Ok(())
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

impl<D: VirtioDevice> Replayer for VirtioReplayer<D> {
    fn replay(&mut self, msg: Msg<'_>, compare: bool) -> Result<(), Mismatch> {
        let kind = msg.kind;
        use RecordKind as K;
        match (RecordKind::parse(kind), msg.body) {
            (_, MsgBody::Request(payload, reply)) if compare => self.request(kind, payload, reply),
            (_, MsgBody::Request(..)) => Ok(()),
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

/// Rebuilds an actor from its header entry; `Err` says why it cannot be.
fn rebuild(info: &ActorInfo, mode: DataMode) -> Result<Box<dyn Replayer>, String> {
    if let Some(why) = &info.not_replayable {
        return Err(why.clone());
    }
    let Some(spec) = info.rebuild.clone() else {
        return Err("the log holds nothing to rebuild it from".into());
    };
    let unsupported = || format!("replay of {} devices is not supported", info.kind);
    match info.kind.parse::<DeviceKind>().map_err(|_| unsupported())? {
        DeviceKind::VirtioBlk => {
            let r: BlkRebuild =
                serde_json::from_value(spec).map_err(|e| format!("bad rebuild data: {e}"))?;
            let blk = Blk::replay(&r).map_err(|e| e.to_string())?;
            Ok(Box::new(VirtioReplayer::new(blk, mode)))
        }
        DeviceKind::VirtioRng => {
            let r: RngRebuild =
                serde_json::from_value(spec).map_err(|e| format!("bad rebuild data: {e}"))?;
            Ok(Box::new(VirtioReplayer::new(Rng::replay(&r), mode)))
        }
        DeviceKind::Uart16550 => mmio::uart(&info.id, spec),
        DeviceKind::TestDevice => mmio::test_device(spec),
        // Its header entry says why (`not_replayable`); a log that claims
        // rebuild data for one is not believed.
        DeviceKind::VirtioFault => Err(unsupported()),
    }
}

/// An actor of the replay: rebuilt, or why not; and its last messages.
struct Actor {
    replayer: Result<Box<dyn Replayer>, String>,
    /// Sequence numbers of its last messages, newest last.
    history: std::collections::VecDeque<u64>,
    removed: bool,
}

impl Actor {
    fn new(info: &ActorInfo, mode: DataMode) -> Self {
        Actor {
            replayer: rebuild(info, mode),
            history: Default::default(),
            removed: false,
        }
    }
}

/// Lines read ahead by the reader thread.
struct Batch {
    /// Line number of the first line.
    first_line: u64,
    text: String,
    /// End of each line in `text` (newlines are not kept).
    ends: Vec<usize>,
}

/// Lines per batch.
const BATCH: usize = 4096;

/// Reads the log's lines on a thread of its own, in batches, so that
/// reading overlaps replaying. The last item is `Err` for a damaged log.
fn read_ahead(mut reader: LogReader) -> crossbeam_channel::Receiver<Result<Batch, LogError>> {
    let (tx, rx) = crossbeam_channel::bounded(4);
    let spawned = std::thread::Builder::new()
        .name("replay-reader".into())
        .spawn(move || loop {
            let mut batch = Batch {
                first_line: reader.line() + 1,
                text: String::with_capacity(BATCH * 256),
                ends: Vec::with_capacity(BATCH),
            };
            let mut error = None;
            while batch.ends.len() < BATCH {
                match reader.next_line() {
                    Ok(Some(line)) => {
                        batch.text.push_str(line);
                        batch.ends.push(batch.text.len());
                    }
                    Ok(None) => break,
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            let last = batch.ends.len() < BATCH;
            if !batch.ends.is_empty() && tx.send(Ok(batch)).is_err() {
                return;
            }
            if let Some(e) = error {
                let _ = tx.send(Err(e));
                return;
            }
            if last {
                return;
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no reader thread; the replay will see no records");
    }
    rx
}

/// Abbreviates a record line for a report: bulk data shortened.
pub fn abbreviate(line: &str, width: usize) -> String {
    let mut out = String::with_capacity(line.len().min(width + 16));
    let mut rest = line;
    while let Some(i) = rest.find("\"b64:") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 5..];
        let end = tail.find('"').unwrap_or(tail.len());
        let bytes = end / 4 * 3;
        let _ = write!(out, "\"<~{bytes} bytes>");
        rest = &tail[end..];
    }
    out.push_str(rest);
    if out.len() > width {
        let mut cut = width;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// Draws a progress bar on stderr, at most ten times a second.
struct Progress {
    enabled: bool,
    total: u64,
    last: Instant,
    started: Instant,
}

impl Progress {
    fn new(enabled: bool, total: u64) -> Self {
        Progress {
            enabled: enabled && std::io::stderr().is_terminal(),
            total: total.max(1),
            last: Instant::now(),
            started: Instant::now(),
        }
    }

    fn tick(&mut self, done: u64, records: u64) {
        if !self.enabled || self.last.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last = Instant::now();
        let frac = (done as f64 / self.total as f64).min(1.0);
        let filled = (frac * 30.0) as usize;
        let rate = records as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let _ = write!(
            std::io::stderr(),
            "\r[{}{}] {:5.1}%  {records} records  {:.0}/s ",
            "#".repeat(filled),
            " ".repeat(30 - filled),
            frac * 100.0,
            rate
        );
    }

    fn done(&self) {
        if self.enabled {
            let _ = write!(std::io::stderr(), "\r{}\r", " ".repeat(72));
        }
    }
}

/// Replays the log at `path`.
pub fn replay(path: &Path, opts: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    let reader = super::open(path).map_err(|error| ReplayError::Log {
        error,
        replayed: Box::default(),
    })?;
    let header = reader.header().clone();
    let mode = header.data;
    let mut actors: HashMap<String, Actor> = HashMap::new();
    for info in &header.actors {
        actors.insert(info.id.clone(), Actor::new(info, mode));
    }
    // An actor without rebuild data in the header may still get it from
    // an `added` record (`switchboard run` writes it there): only an actor
    // the header marks not replayable is refused before reading on.
    if let Some(d) = &opts.device {
        if let Some(why) = header
            .actors
            .iter()
            .find(|a| a.id == *d)
            .and_then(|a| a.not_replayable.as_ref())
        {
            return Err(ReplayError::Rebuild {
                path: path.display().to_string(),
                what: format!("actor {d} cannot be replayed: {why}"),
            });
        }
    }
    let rebuild_error = |what: String| ReplayError::Rebuild {
        path: path.display().to_string(),
        what,
    };
    let mut report = ReplayReport::default();
    let mut progress = Progress::new(opts.progress, reader.file_len());
    let batches = read_ahead(reader);
    let mut done_bytes = 0u64;
    let mut seen_device = false;
    // False when `--until` stopped the replay before the end of the log.
    let mut ended = true;
    'log: for batch in batches {
        let batch = match batch {
            Ok(b) => b,
            Err(error) => {
                progress.done();
                return Err(ReplayError::Log {
                    error,
                    replayed: Box::new(report),
                });
            }
        };
        done_bytes += batch.text.len() as u64 + batch.ends.len() as u64;
        progress.tick(done_bytes, report.records);
        let mut start = 0;
        for (i, &end) in batch.ends.iter().enumerate() {
            let text = &batch.text[start..end];
            start = end;
            let line_no = batch.first_line + i as u64;
            let kind = peek_type(text).unwrap_or("");
            // A virtio request is parsed in one pass; anything else in two.
            let request = !kind.is_empty()
                && !is_protocol(kind)
                && peek_to(text)
                    .and_then(|to| actors.get(to))
                    .is_some_and(|a| a.replayer.as_ref().is_ok_and(|r| r.takes_requests()));
            let parsed = if !request {
                LogReader::parse(path, line_no, text).map(|rec| {
                    let msg = Msg {
                        seq: rec.seq,
                        line: line_no,
                        kind,
                        text,
                        body: MsgBody::Raw {
                            payload: rec.payload,
                            reply: rec.reply,
                        },
                    };
                    // An interrupt message is replayed by the device that
                    // sent it.
                    let actor = if kind == mmio::IRQ { rec.from } else { rec.to };
                    (rec.seq, actor, msg)
                })
            } else {
                serde_json::from_str::<RequestLine<'_>>(text)
                    .map(|rec| {
                        let msg = Msg {
                            seq: rec.seq,
                            line: line_no,
                            kind,
                            text,
                            body: MsgBody::Request(rec.payload, rec.reply),
                        };
                        (rec.seq, rec.to, msg)
                    })
                    .map_err(|e| LogError::BadRecord {
                        path: path.to_path_buf(),
                        line: line_no,
                        why: e.to_string(),
                    })
            };
            let (seq, to, msg) = match parsed {
                Ok(p) => p,
                Err(error) => {
                    progress.done();
                    return Err(ReplayError::Log {
                        error,
                        replayed: Box::new(report),
                    });
                }
            };
            report.records += 1;
            if opts.until.is_some_and(|u| seq > u) {
                ended = false;
                break 'log;
            }
            let parsed_kind = RecordKind::parse(kind);
            if parsed_kind == ParsedKind::Known(RecordKind::Gap) && to == "recorder" {
                report.gaps += 1;
                #[derive(serde::Deserialize)]
                struct Gap {
                    dropped: u64,
                }
                if let Ok(g) = serde_json::from_str::<Gap>(msg.body.raw().0) {
                    report.dropped += g.dropped;
                }
                // Whose records were lost is not known: an actor whose
                // replies depend on its earlier messages cannot be followed
                // past here.
                for a in actors.values_mut() {
                    if a.replayer.as_ref().is_ok_and(|r| r.stateful()) {
                        a.replayer = Err(format!(
                            "the gap at seq {seq} may have lost records its state depends on, \
                             so it is not replayed after it"
                        ));
                    }
                }
                continue;
            }
            if parsed_kind == ParsedKind::Known(RecordKind::Added) {
                let info: ActorInfo = serde_json::from_str(msg.body.raw().0).map_err(|e| {
                    rebuild_error(format!("line {line_no}: bad `added` record: {e}"))
                })?;
                actors.insert(info.id.clone(), Actor::new(&info, mode));
                continue;
            }
            let wanted = opts.device.as_deref().is_none_or(|d| d == to);
            if !wanted {
                report.skipped += 1;
                continue;
            }
            seen_device = true;
            let Some(actor) = actors.get_mut(&*to) else {
                return Err(rebuild_error(format!(
                    "line {line_no}: seq {seq} is addressed to {to:?}, which neither the header \
                     nor an `added` record describes"
                )));
            };
            if parsed_kind == ParsedKind::Known(RecordKind::Removed) {
                actor.removed = true;
                if let Ok(r) = &mut actor.replayer {
                    let compare = opts.from.is_none_or(|f| seq >= f);
                    if let Err(m) = r.removed(msg, compare) {
                        progress.done();
                        let history = actor.history.iter().copied().collect::<Vec<_>>();
                        let at = (seq, line_no, kind, abbreviate(text, 200));
                        return Err(diverged(path, &to, at, m, &history));
                    }
                }
                continue;
            }
            let replayer = match &mut actor.replayer {
                Ok(r) => r,
                Err(why) => {
                    let e = report
                        .not_replayable
                        .entry(to.to_string())
                        .or_insert((0, why.clone()));
                    e.0 += 1;
                    continue;
                }
            };
            if opts.from.is_some_and(|f| seq < f) {
                if replayer.stateful() {
                    let _ = replayer.replay(msg, false);
                }
                report.skipped += 1;
                continue;
            }
            let mismatch = if actor.removed {
                Err(Mismatch::new(
                    "a message to a device after its removal",
                    "no message",
                    "a message",
                ))
            } else {
                replayer.replay(msg, true)
            };
            if let Err(m) = mismatch {
                progress.done();
                let history = actor.history.iter().copied().collect::<Vec<_>>();
                let at = (seq, line_no, kind, abbreviate(text, 200));
                return Err(diverged(path, &to, at, m, &history));
            }
            // The history is of messages the actor handled; an interrupt
            // message is one it sent.
            if kind != mmio::IRQ {
                if actor.history.len() == HISTORY {
                    actor.history.pop_front();
                }
                actor.history.push_back(seq);
            }
            match report.per_actor.get_mut(&*to) {
                Some(n) => *n += 1,
                None => {
                    report.per_actor.insert(to.to_string(), 1);
                }
            }
        }
    }
    progress.done();
    if ended {
        // What an actor recorded and could not check yet (an interrupt
        // message with no record of its cause after it): the earliest.
        let mut first: Option<(String, Mismatch, Vec<u64>)> = None;
        for (id, actor) in &mut actors {
            if opts.device.as_deref().is_some_and(|d| d != id) {
                continue;
            }
            let Ok(r) = &mut actor.replayer else { continue };
            if let Err(m) = r.finish() {
                let seq = |m: &Mismatch| m.earlier.as_ref().map_or(u64::MAX, |e| e.seq);
                if first.as_ref().is_none_or(|(_, f, _)| seq(&m) < seq(f)) {
                    first = Some((id.clone(), m, actor.history.iter().copied().collect()));
                }
            }
        }
        if let Some((id, m, history)) = first {
            let at = (0, 0, "", String::new());
            return Err(diverged(path, &id, at, m, &history));
        }
    }
    if let Some(d) = &opts.device {
        if let Some((_, why)) = report.not_replayable.get(d) {
            // Not even partly: a gap ends a replay partway.
            if !report.per_actor.contains_key(d) {
                return Err(rebuild_error(format!(
                    "actor {d} cannot be replayed: {why}"
                )));
            }
        }
        if !seen_device {
            let mut ids: Vec<_> = actors.keys().cloned().collect();
            ids.sort();
            return Err(rebuild_error(format!(
                "no messages to {d:?} in the log (actors: {})",
                ids.join(", ")
            )));
        }
    }
    Ok(report)
}

/// The divergence `m` found replaying the record `at` (seq, line, type,
/// abbreviated line) to `actor`, or the earlier record `m` names; with
/// the lines of `history` (the actor's last messages) read again.
fn diverged(
    path: &Path,
    actor: &str,
    at: (u64, u64, &str, String),
    m: Mismatch,
    history: &[u64],
) -> ReplayError {
    let (seq, line, kind, message) = match m.earlier {
        Some(e) => (e.seq, e.line, e.kind.to_string(), e.message.clone()),
        None => (at.0, at.1, at.2.to_string(), at.3),
    };
    let d = Divergence {
        seq,
        line,
        actor: actor.to_string(),
        kind,
        message,
        what: m.what,
        expected: m.expected,
        actual: m.actual,
        history: Vec::new(),
    };
    ReplayError::Diverged(Box::new(with_history(path, d, history)))
}

/// Fills a divergence's history with the lines of the given sequence
/// numbers (read again: cheaper than keeping every line while replaying).
fn with_history(path: &Path, mut d: Divergence, seqs: &[u64]) -> Divergence {
    if seqs.is_empty() {
        return d;
    }
    let Ok(mut reader) = super::open(path) else {
        return d;
    };
    let last = seqs[seqs.len() - 1];
    loop {
        let line_no = reader.line() + 1;
        let Ok(Some(text)) = reader.next_line() else {
            break;
        };
        let Ok(rec) = LogReader::parse(path, line_no, text) else {
            break;
        };
        if seqs.contains(&rec.seq) {
            d.history
                .push((rec.seq, rec.kind.to_string(), abbreviate(text, 160)));
        }
        if rec.seq >= last {
            break;
        }
    }
    d
}
