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
//! entropy come from the recording, through the same
//! [`Request`](crate::models::virtio::Request) methods
//! the live device uses, and its writes are collected instead of done.
//!
//! A device on a bus (the UART, the test device) is rebuilt without its
//! sink or timers and fed its accesses and inputs in log order; its
//! replies and its interrupt messages are compared (see `mmio.rs`). Its
//! state depends on every record before, so after a `gap` record it is no
//! longer replayed.
//!
//! Either form of log is read: a JSON Lines log's lines are read ahead on
//! a thread of their own and parsed; a binary log's records are taken
//! straight from the reader's block on this thread, a virtio request
//! decoded in place into reused buffers, with no JSON (a record's line is
//! rendered only for a report). Both end up in the same `Run::step`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use switchboard_runtime::recording::binary::{get_json_body, CODEC_JSON, CODEC_VIRTIO_REQUEST};
use switchboard_runtime::recording::{
    render_line, ActorInfo, BinRecord, DataMode, LogError, LogReader, ParsedKind, RecordKind,
    Render,
};

use crate::models::blk::{Blk, BlkRebuild};
use crate::models::rng::{Rng, RngRebuild};
use crate::models::virtio::DecodedRequest;
use crate::models::DeviceKind;
use crate::vhost_user::{RequestPayload, RequestReply};

mod mmio;
mod virtio;

use virtio::VirtioReplayer;

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
    /// Device failures the log records (`failed`), in order: seq, device,
    /// reason. Replay goes on past them (a restarted device's `added`
    /// rebuilds it).
    pub failures: Vec<(u64, String, String)>,
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
    /// `kind`, parsed.
    parsed: ParsedKind<'a>,
    /// The whole record, for a report.
    text: Line<'a>,
    body: MsgBody<'a>,
}

/// A record as a report shows it: its JSON line, rendered from the binary
/// form only when a report needs it.
#[derive(Clone, Copy)]
enum Line<'a> {
    /// A JSON Lines log's line.
    Text(&'a str),
    /// A binary log's record, and how its reader renders bodies.
    Binary(&'a BinRecord<'a>, Render),
}

impl Line<'_> {
    /// The line, abbreviated ([`abbreviate`]).
    fn abbreviate(&self, width: usize) -> String {
        match self {
            Line::Text(t) => abbreviate(t, width),
            Line::Binary(r, render) => {
                let (mut text, mut payload, mut reply) = (String::new(), Vec::new(), Vec::new());
                match render_line(&mut text, r, *render, &mut payload, &mut reply) {
                    Ok(()) => abbreviate(&text, width),
                    Err(why) => format!("(seq {}: the record does not render: {why})", r.seq),
                }
            }
        }
    }
}

enum MsgBody<'a> {
    /// A virtio request, parsed from its JSON line.
    Request(RequestPayload, RequestReply),
    /// A virtio request, decoded from the binary form into buffers the
    /// replay reuses.
    Decoded(&'a mut DecodedRequest),
    /// Anything else, payload and reply unparsed.
    Raw { payload: &'a str, reply: &'a str },
}

impl MsgBody<'_> {
    fn raw(&self) -> (&str, &str) {
        match self {
            MsgBody::Raw { payload, reply } => (payload, reply),
            MsgBody::Request(..) | MsgBody::Decoded(_) => ("null", "null"),
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

/// A record as the replay loop gets it, from either form.
struct Rec<'a> {
    msg: Msg<'a>,
    /// The actor it is for: its receiver, or the sender of an interrupt
    /// message.
    actor: Cow<'a, str>,
    /// That actor's slot, when the caller already knows it.
    slot: Option<usize>,
}

/// The replay's state: the actors, and what has been replayed so far.
struct Run<'p> {
    path: &'p Path,
    opts: &'p ReplayOptions,
    mode: DataMode,
    /// Every actor the log describes, in the order it is met; a later
    /// `added` record for the same id replaces it in its slot.
    actors: Vec<(String, Actor)>,
    slots: HashMap<String, usize>,
    /// Messages replayed per slot (kept when an `added` record replaces
    /// the slot's actor): the report's `per_actor`.
    replayed: Vec<u64>,
    report: ReplayReport,
    seen_device: bool,
}

/// Whether to read on.
enum Step {
    Next,
    /// `--until` was passed.
    Until,
}

impl<'p> Run<'p> {
    fn rebuild_error(&self, what: String) -> ReplayError {
        ReplayError::Rebuild {
            path: self.path.display().to_string(),
            what,
        }
    }

    fn slot(&self, id: &str) -> Option<usize> {
        self.slots.get(id).copied()
    }

    fn add(&mut self, info: &ActorInfo) {
        let actor = Actor::new(info, self.mode);
        match self.slot(&info.id) {
            Some(i) => self.actors[i].1 = actor,
            None => {
                self.slots.insert(info.id.clone(), self.actors.len());
                self.actors.push((info.id.clone(), actor));
                self.replayed.push(0);
            }
        }
    }

    /// Whether the actor in `slot` takes virtio requests.
    fn takes_requests(&self, slot: usize) -> bool {
        self.actors[slot]
            .1
            .replayer
            .as_ref()
            .is_ok_and(|r| r.takes_requests())
    }

    /// The report so far.
    fn report(&self) -> ReplayReport {
        let mut report = self.report.clone();
        for ((id, _), &n) in self.actors.iter().zip(&self.replayed) {
            if n > 0 {
                report.per_actor.insert(id.clone(), n);
            }
        }
        report
    }

    fn log_error(&self, error: LogError) -> ReplayError {
        ReplayError::Log {
            error,
            replayed: Box::new(self.report()),
        }
    }

    /// Replays one record.
    fn step(&mut self, rec: Rec<'_>) -> Result<Step, ReplayError> {
        let Rec {
            msg,
            actor: to,
            slot,
        } = rec;
        let (seq, line_no, kind, parsed_kind, text) =
            (msg.seq, msg.line, msg.kind, msg.parsed, msg.text);
        let opts = self.opts;
        self.report.records += 1;
        if opts.until.is_some_and(|u| seq > u) {
            return Ok(Step::Until);
        }
        if parsed_kind == ParsedKind::Known(RecordKind::Gap) && to == "recorder" {
            self.report.gaps += 1;
            #[derive(serde::Deserialize)]
            struct Gap {
                dropped: u64,
            }
            if let Ok(g) = serde_json::from_str::<Gap>(msg.body.raw().0) {
                self.report.dropped += g.dropped;
            }
            // Whose records were lost is not known: an actor whose
            // replies depend on its earlier messages cannot be followed
            // past here.
            for (_, a) in &mut self.actors {
                if a.replayer.as_ref().is_ok_and(|r| r.stateful()) {
                    a.replayer = Err(format!(
                        "the gap at seq {seq} may have lost records its state depends on, \
                         so it is not replayed after it"
                    ));
                }
            }
            return Ok(Step::Next);
        }
        if parsed_kind == ParsedKind::Known(RecordKind::Added) {
            let info: ActorInfo = serde_json::from_str(msg.body.raw().0).map_err(|e| {
                self.rebuild_error(format!("line {line_no}: bad `added` record: {e}"))
            })?;
            self.add(&info);
            return Ok(Step::Next);
        }
        let wanted = opts.device.as_deref().is_none_or(|d| d == to);
        if !wanted {
            self.report.skipped += 1;
            return Ok(Step::Next);
        }
        self.seen_device = true;
        let Some(slot) = slot.or_else(|| self.slot(&to)) else {
            return Err(self.rebuild_error(format!(
                "line {line_no}: seq {seq} is addressed to {to:?}, which neither the header \
                 nor an `added` record describes"
            )));
        };
        if parsed_kind == ParsedKind::Known(RecordKind::Failed) {
            #[derive(serde::Deserialize)]
            struct Failed {
                reason: String,
            }
            let reason = serde_json::from_str::<Failed>(msg.body.raw().0)
                .map_or_else(|e| format!("<no reason: {e}>"), |f| f.reason);
            self.report.failures.push((seq, to.to_string(), reason));
            return Ok(Step::Next);
        }
        let path = self.path;
        let actor = &mut self.actors[slot].1;
        let diverged_here = |actor: &Actor, m: Mismatch| {
            let history = actor.history.iter().copied().collect::<Vec<_>>();
            let at = (seq, line_no, kind, text.abbreviate(200));
            diverged(path, &to, at, m, &history)
        };
        if parsed_kind == ParsedKind::Known(RecordKind::Removed) {
            actor.removed = true;
            if let Ok(r) = &mut actor.replayer {
                let compare = opts.from.is_none_or(|f| seq >= f);
                if let Err(m) = r.removed(msg, compare) {
                    return Err(diverged_here(actor, m));
                }
            }
            return Ok(Step::Next);
        }
        let replayer = match &mut actor.replayer {
            Ok(r) => r,
            Err(why) => {
                let e = self
                    .report
                    .not_replayable
                    .entry(to.to_string())
                    .or_insert((0, why.clone()));
                e.0 += 1;
                return Ok(Step::Next);
            }
        };
        if opts.from.is_some_and(|f| seq < f) {
            if replayer.stateful() {
                let _ = replayer.replay(msg, false);
            }
            self.report.skipped += 1;
            return Ok(Step::Next);
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
            return Err(diverged_here(actor, m));
        }
        // The history is of messages the actor handled; an interrupt
        // message is one it sent.
        if kind != mmio::IRQ {
            if actor.history.len() == HISTORY {
                actor.history.pop_front();
            }
            actor.history.push_back(seq);
        }
        self.replayed[slot] += 1;
        Ok(Step::Next)
    }

    /// Replays a JSON Lines log, read ahead on a thread of its own.
    fn json_lines(
        &mut self,
        reader: LogReader,
        progress: &mut Progress,
    ) -> Result<Step, ReplayError> {
        let path = self.path;
        let batches = read_ahead(reader);
        let mut done_bytes = 0u64;
        for batch in batches {
            let batch = batch.map_err(|e| self.log_error(e))?;
            done_bytes += batch.text.len() as u64 + batch.ends.len() as u64;
            progress.tick(done_bytes, self.report.records);
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
                        .and_then(|to| self.slot(to))
                        .is_some_and(|s| self.takes_requests(s));
                let parsed = if !request {
                    LogReader::parse(path, line_no, text).map(|rec| {
                        // An interrupt message is replayed by the device
                        // that sent it.
                        let actor = if kind == mmio::IRQ { rec.from } else { rec.to };
                        Rec {
                            msg: Msg {
                                seq: rec.seq,
                                line: line_no,
                                kind,
                                parsed: RecordKind::parse(kind),
                                text: Line::Text(text),
                                body: MsgBody::Raw {
                                    payload: rec.payload.get(),
                                    reply: rec.reply.get(),
                                },
                            },
                            actor,
                            slot: None,
                        }
                    })
                } else {
                    serde_json::from_str::<RequestLine<'_>>(text)
                        .map(|rec| Rec {
                            msg: Msg {
                                seq: rec.seq,
                                line: line_no,
                                kind,
                                parsed: RecordKind::parse(kind),
                                text: Line::Text(text),
                                body: MsgBody::Request(rec.payload, rec.reply),
                            },
                            actor: rec.to,
                            slot: None,
                        })
                        .map_err(|e| LogError::BadRecord {
                            path: path.to_path_buf(),
                            line: line_no,
                            why: e.to_string(),
                        })
                };
                let rec = parsed.map_err(|e| self.log_error(e))?;
                if let Step::Until = self.step(rec)? {
                    return Ok(Step::Until);
                }
            }
        }
        Ok(Step::Next)
    }

    /// Replays a binary log, record by record on this thread, each
    /// borrowed from the reader's block: a virtio request is decoded in
    /// place into one reused [`DecodedRequest`], and its names, kind and
    /// actor are looked up once per name, not once per record.
    fn binary(
        &mut self,
        mut reader: LogReader,
        progress: &mut Progress,
    ) -> Result<Step, ReplayError> {
        let path = self.path;
        let render = reader.render();
        let mut decoded = DecodedRequest::default();
        let (mut payload, mut reply) = (Vec::new(), Vec::new());
        // Per name index: the kind it names, when it is one of
        // `RecordKind::KNOWN` (`Some(None)`: a message type); and the slot
        // of the actor it names, once known (a slot never changes).
        let mut kinds: Vec<Option<Option<RecordKind>>> = Vec::new();
        let mut slots: Vec<Option<usize>> = Vec::new();
        loop {
            if self.report.records % 1024 == 0 {
                progress.tick(reader.position(), self.report.records);
            }
            let r = match reader.next_binary() {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(Step::Next),
                Err(e) => return Err(self.log_error(e)),
            };
            // Its position counting the header as 1, as `reader.line()`.
            let line_no = self.report.records + 2;
            let [from_i, to_i, kind_i] = r.names.map(|i| i as usize);
            let known = match kinds.get(kind_i) {
                Some(Some(k)) => *k,
                _ => {
                    let k = match RecordKind::parse(r.kind) {
                        ParsedKind::Known(k) => Some(k),
                        ParsedKind::Message(_) => None,
                    };
                    if kinds.len() <= kind_i {
                        kinds.resize(kind_i + 1, None);
                    }
                    kinds[kind_i] = Some(k);
                    k
                }
            };
            let parsed = known.map_or(ParsedKind::Message(r.kind), ParsedKind::Known);
            let irq = r.kind == mmio::IRQ;
            let (actor, actor_i) = if irq { (r.from, from_i) } else { (r.to, to_i) };
            let slot = match slots.get(actor_i) {
                Some(Some(s)) => Some(*s),
                _ => {
                    let s = self.slot(actor);
                    if s.is_some() {
                        if slots.len() <= actor_i {
                            slots.resize(actor_i + 1, None);
                        }
                        slots[actor_i] = s;
                    }
                    s
                }
            };
            let bad = |why: String| LogError::BadRecord {
                path: path.to_path_buf(),
                line: line_no,
                why,
            };
            let protocol = known.is_some_and(|k| !k.is_message());
            let body = match r.codec {
                CODEC_VIRTIO_REQUEST
                    if !protocol && !irq && slot.is_some_and(|s| self.takes_requests(s)) =>
                {
                    decoded
                        .decode(r.body)
                        .map_err(|why| self.log_error(bad(why)))?;
                    MsgBody::Decoded(&mut decoded)
                }
                CODEC_JSON => {
                    let (p, q) = get_json_body(r.body).ok_or_else(|| {
                        self.log_error(bad("a JSON body that does not decode".into()))
                    })?;
                    for json in [p, q] {
                        serde_json::from_str::<&RawValue>(json)
                            .map_err(|e| self.log_error(bad(e.to_string())))?;
                    }
                    MsgBody::Raw {
                        payload: p,
                        reply: q,
                    }
                }
                codec => {
                    // Rendered as its JSON line would be: a request to an
                    // actor that does not take requests, say.
                    payload.clear();
                    reply.clear();
                    render(codec, r.body, &mut payload, &mut reply)
                        .map_err(|why| self.log_error(bad(why)))?;
                    let utf8 = |b| std::str::from_utf8(b).map_err(|e| bad(e.to_string()));
                    MsgBody::Raw {
                        payload: utf8(&payload).map_err(|e| self.log_error(e))?,
                        reply: utf8(&reply).map_err(|e| self.log_error(e))?,
                    }
                }
            };
            let rec = Rec {
                msg: Msg {
                    seq: r.seq,
                    line: line_no,
                    kind: r.kind,
                    parsed,
                    text: Line::Binary(&r, render),
                    body,
                },
                actor: Cow::Borrowed(actor),
                slot,
            };
            if let Step::Until = self.step(rec)? {
                return Ok(Step::Until);
            }
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
    let mut run = Run {
        path,
        opts,
        mode: header.data,
        actors: Vec::new(),
        slots: HashMap::new(),
        replayed: Vec::new(),
        report: ReplayReport::default(),
        seen_device: false,
    };
    for info in &header.actors {
        run.add(info);
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
            return Err(run.rebuild_error(format!("actor {d} cannot be replayed: {why}")));
        }
    }
    let mut progress = Progress::new(opts.progress, reader.file_len());
    let read = if reader.is_binary() {
        run.binary(reader, &mut progress)
    } else {
        run.json_lines(reader, &mut progress)
    };
    progress.done();
    // False when `--until` stopped the replay before the end of the log.
    let ended = matches!(read?, Step::Next);
    if ended {
        // What an actor recorded and could not check yet (an interrupt
        // message with no record of its cause after it): the earliest.
        let mut first: Option<(String, Mismatch, Vec<u64>)> = None;
        for (id, actor) in &mut run.actors {
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
    let report = run.report();
    if let Some(d) = &opts.device {
        if let Some((_, why)) = report.not_replayable.get(d) {
            // Not even partly: a gap ends a replay partway.
            if !report.per_actor.contains_key(d) {
                return Err(run.rebuild_error(format!("actor {d} cannot be replayed: {why}")));
            }
        }
        if !run.seen_device {
            let mut ids: Vec<_> = run.actors.iter().map(|(id, _)| id.clone()).collect();
            ids.sort();
            return Err(run.rebuild_error(format!(
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
