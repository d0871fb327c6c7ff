// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard log`: reading a message log as a person would.
//!
//! [`inspect`] reads a log written by
//! [`switchboard_runtime::recording::Recorder`] (the format is described
//! there) with its [`LogReader`], keeps the records that pass the filters of
//! [`InspectOptions`] and writes one of three views:
//!
//! - a listing: a short summary of the header, then one aligned line per
//!   record, with bulk data abbreviated (`<4096 bytes>`);
//! - the matching lines unchanged (`--json`), for `jq`;
//! - a latency table per actor and message type (`--stats`).
//!
//! Records are streamed: a log is never held in memory, except the
//! latencies the table is made of. A log cut off in the middle of a record
//! is shown up to the cut, then reported as [`LogError::Truncated`].

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use switchboard_runtime::recording::{
    Data, DataMode, Header, LogError, LogReader, Record, RecordKind,
};

/// Characters of payload and reply shown on a listing line, beyond which
/// the summary is cut with `…`.
pub const SUMMARY_WIDTH: usize = 120;

/// Data of at most this many bytes is shown in hex.
const HEX_MAX: usize = 16;

/// The type and actor of the recorder's own `gap` records.
const GAP: &str = RecordKind::Gap.as_str();
const RECORDER: &str = "recorder";

/// What to show of a log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InspectOptions {
    /// Only records to or from this actor.
    pub device: Option<String>,
    /// Only records of this message type (the JSON `type`).
    pub kind: Option<String>,
    /// Only records with at least this sequence number.
    pub from: Option<u64>,
    /// Only records with at most this sequence number; reading stops there.
    pub until: Option<u64>,
    /// A latency table instead of a listing.
    pub stats: bool,
    /// JSON output: the matching lines unchanged, or the table as one JSON
    /// object.
    pub json: bool,
}

/// What [`inspect`] read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InspectSummary {
    /// Records read, up to `until`.
    pub read: u64,
    /// Records that passed the filters (listed, or counted in the table).
    pub matched: u64,
    /// `gap` records within `from..=until`, whatever the other filters.
    pub gaps: u64,
    /// Records those gaps say were dropped.
    pub dropped: u64,
}

/// Why a log could not be shown (in full).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The log could not be read, or not to its end. Whatever came before
    /// the failing line has been written.
    #[error(transparent)]
    ReadLog(#[from] LogError),
    /// Writing the output failed.
    #[error("Write the log listing")]
    WriteOutput(#[source] io::Error),
}

impl InspectError {
    /// Whether the output was closed by its reader (`switchboard log ... |
    /// head`): the caller should stop quietly, this is not a failure.
    pub fn is_closed_output(&self) -> bool {
        match self {
            InspectError::ReadLog(_) => false,
            InspectError::WriteOutput(e) => e.kind() == io::ErrorKind::BrokenPipe,
        }
    }
}

/// The result of [`inspect`].
pub type Result<T> = std::result::Result<T, InspectError>;

/// Reads the log at `path` and writes the view `opts` asks for to `out`.
///
/// On a cut-off or malformed line, everything before it is written (for
/// `stats`, the table of the records before it), then the
/// [`InspectError::ReadLog`] naming the file and line is returned.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use switchboard_devices::log::inspect::{inspect, InspectOptions};
/// use switchboard_runtime::recording::{
///     DataMode, Entry, Header, JsonBody, RecordKind, RecordOptions, Recorder,
/// };
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("log");
/// let header = Header::new("doc".into(), DataMode::Value, serde_json::json!({}), vec![]);
/// let recorder = Recorder::create(&path, &header, RecordOptions::default())?;
/// recorder.record(Entry {
///     time: 1_500_000,
///     latency: 42_000,
///     from: Arc::from("driver/q0"),
///     to: Arc::from("rng0"),
///     kind: RecordKind::Message("entropy"),
///     body: Box::new(JsonBody {
///         payload: serde_json::json!({ "len": 4 }),
///         reply: serde_json::json!({ "data": "b64:AQIDBA==" }),
///     }),
/// });
/// recorder.finish()?;
///
/// let mut out = Vec::new();
/// let summary = inspect(&path, &InspectOptions::default(), &mut out)?;
/// assert_eq!(summary.matched, 1);
/// let text = String::from_utf8(out)?;
/// assert!(text.contains("driver/q0   → rng0"));
/// assert!(text.contains("len=4 → data=<4 bytes 01020304>"));
/// # Ok(())
/// # }
/// ```
pub fn inspect(path: &Path, opts: &InspectOptions, out: &mut dyn Write) -> Result<InspectSummary> {
    let mut reader = super::open(path)?;
    let mut out = io::BufWriter::new(out);
    let mut view = match (opts.stats, opts.json) {
        (false, false) => View::Listing(Listing::new(reader.header())),
        (false, true) => View::Lines,
        (true, json) => View::Stats(Stats::default(), json),
    };
    if let View::Listing(listing) = &view {
        write_header(&mut out, path, reader.header()).map_err(InspectError::WriteOutput)?;
        listing
            .write_columns(&mut out)
            .map_err(InspectError::WriteOutput)?;
    }
    let mut summary = InspectSummary::default();
    let read = loop {
        let line = reader.line() + 1;
        let text = match reader.next_line() {
            Ok(Some(text)) => text,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let record = match LogReader::parse(path, line, text) {
            Ok(record) => record,
            Err(e) => break Err(e),
        };
        if opts.until.is_some_and(|until| record.seq > until) {
            break Ok(());
        }
        summary.read += 1;
        let last = opts.until.is_some_and(|until| record.seq >= until);
        if opts.from.is_some_and(|from| record.seq < from) {
            continue;
        }
        let gap = is_gap(&record);
        if gap {
            summary.gaps += 1;
            summary.dropped += dropped(record.payload);
        }
        if opts.matches(&record) {
            summary.matched += 1;
            let written = match &mut view {
                View::Listing(listing) => listing.write_record(&mut out, &record),
                View::Lines => writeln!(out, "{text}"),
                View::Stats(stats, _) => {
                    if !gap {
                        stats.add(&record);
                    }
                    Ok(())
                }
            };
            written.map_err(InspectError::WriteOutput)?;
        }
        if last {
            // The next line is not needed: a cut-off tail after it is no
            // error for this view.
            break Ok(());
        }
    };
    let finished = match &view {
        View::Listing(_) => write_gap_note(&mut out, &summary),
        View::Lines => Ok(()),
        View::Stats(stats, false) => stats.write_table(&mut out, &summary),
        View::Stats(stats, true) => stats.write_json(&mut out, &summary),
    }
    .and_then(|()| out.flush());
    // A read error says more than a failed write after it.
    read?;
    finished.map_err(InspectError::WriteOutput)?;
    Ok(summary)
}

impl InspectOptions {
    /// Whether `record` passes the device and type filters.
    fn matches(&self, record: &Record<'_>) -> bool {
        let device = self
            .device
            .as_deref()
            .is_none_or(|d| record.to == d || record.from == d);
        let kind = self.kind.as_deref().is_none_or(|k| record.kind == k);
        device && kind
    }
}

/// What [`inspect`] writes.
enum View {
    /// A summary line per record.
    Listing(Listing),
    /// The raw lines.
    Lines,
    /// A latency table; as JSON when true.
    Stats(Stats, bool),
}

fn is_gap(record: &Record<'_>) -> bool {
    record.kind == GAP && record.to == RECORDER
}

/// The `dropped` count of a gap record's payload (0 if it has none).
fn dropped(payload: &RawValue) -> u64 {
    #[derive(serde::Deserialize)]
    struct Gap {
        #[serde(default)]
        dropped: u64,
    }
    serde_json::from_str::<Gap>(payload.get()).map_or(0, |g| g.dropped)
}

/// Writes the header summary that opens a listing.
fn write_header(out: &mut dyn Write, path: &Path, header: &Header) -> io::Result<()> {
    let data = match header.data {
        DataMode::Value => "value (bulk data recorded as bytes)",
        DataMode::Hash => "hash (bulk data recorded as length and XXH3 hash)",
    };
    writeln!(out, "log      {}", path.display())?;
    writeln!(
        out,
        "format   {} version {}, written by switchboard {}",
        header.format, header.version, header.switchboard
    )?;
    writeln!(out, "command  {}", header.command)?;
    writeln!(out, "data     {data}")?;
    writeln!(out, "started  {}", utc(header.started_unix_ms))?;
    let id_width = header.actors.iter().map(|a| a.id.len()).max().unwrap_or(0);
    let kind_width = header
        .actors
        .iter()
        .map(|a| a.kind.len())
        .max()
        .unwrap_or(0);
    if header.actors.is_empty() {
        writeln!(out, "actors   (none)")?;
    }
    for (i, actor) in header.actors.iter().enumerate() {
        let label = if i == 0 { "actors" } else { "" };
        let replay = match &actor.not_replayable {
            None => "replayable".to_string(),
            Some(why) => format!("not replayable: {why}"),
        };
        writeln!(
            out,
            "{label:<8} {:<id_width$}  {:<kind_width$}  {replay}",
            actor.id, actor.kind
        )?;
    }
    writeln!(out)
}

/// `ms` since the Unix epoch as `YYYY-MM-DD hh:mm:ss.mmm UTC`.
fn utc(ms: u64) -> String {
    let days = (ms / 86_400_000) as i64;
    let in_day = ms % 86_400_000;
    // Days to a civil date: H. Hinnant, "chrono-Compatible Low-Level Date
    // Algorithms", days_from_civil's inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    )
}

/// Nanoseconds as milliseconds with 3 decimals.
fn ms(ns: u64) -> String {
    format!("{}.{:03}", ns / 1_000_000, ns / 1000 % 1000)
}

/// Nanoseconds as microseconds with 1 decimal.
fn us(ns: u64) -> String {
    format!("{}.{}", ns / 1000, ns / 100 % 10)
}

/// The listing's column widths. Records are streamed, so a column widens
/// when a wider value comes and stays wide: later lines line up again.
struct Listing {
    from: usize,
    to: usize,
    kind: usize,
}

impl Listing {
    fn new(header: &Header) -> Self {
        let to = header
            .actors
            .iter()
            .map(|a| a.id.chars().count())
            .chain([RECORDER.len()])
            .max()
            .unwrap_or(0);
        Listing {
            from: "switchboard".len(),
            to,
            kind: "GET_VRING_BASE".len(),
        }
    }

    fn write_columns(&self, out: &mut dyn Write) -> io::Result<()> {
        let (from, to, kind) = (self.from, self.to, self.kind);
        writeln!(
            out,
            "{:>8}  {:>11}  {:>10}  {:<from$} → {:<to$}  {:<kind$}  payload → reply",
            "seq", "time ms", "latency µs", "from", "to", "type"
        )
    }

    fn write_record(&mut self, out: &mut dyn Write, record: &Record<'_>) -> io::Result<()> {
        self.from = self.from.max(record.from.chars().count());
        self.to = self.to.max(record.to.chars().count());
        self.kind = self.kind.max(record.kind.chars().count());
        let (from, to, kind) = (self.from, self.to, self.kind);
        writeln!(
            out,
            "{:>8}  {:>11}  {:>10}  {:<from$} → {:<to$}  {:<kind$}  {}",
            record.seq,
            ms(record.time),
            us(record.latency),
            record.from,
            record.to,
            record.kind,
            summarize(record.payload, record.reply, SUMMARY_WIDTH)
        )
    }
}

/// Ends a listing with a word on gaps: filtered out or not, they mean the
/// listing may miss records.
fn write_gap_note(out: &mut dyn Write, summary: &InspectSummary) -> io::Result<()> {
    if summary.gaps == 0 {
        return Ok(());
    }
    writeln!(
        out,
        "\nnote: {} gap record(s) in range: {} record(s) were dropped while recording \
         and are missing here",
        summary.gaps, summary.dropped
    )
}

/// Payload and reply as one line of at most `width` characters: objects as
/// `key=value` (fields that are null or empty left out), bulk data as its
/// length, and the reply after ` → ` unless it is null. When both do not
/// fit, the reply keeps up to 2/5 of the room (more if the payload is
/// short), so that a long request still shows its outcome.
fn summarize(payload: &RawValue, reply: &RawValue, width: usize) -> String {
    let mut p = String::new();
    render(payload, &mut p);
    if p.is_empty() {
        p.push('-');
    }
    let mut r = String::new();
    render(reply, &mut r);
    if r.is_empty() {
        cut(&mut p, width);
        return p;
    }
    let room = width.saturating_sub(" → ".chars().count());
    let (p_len, r_len) = (p.chars().count(), r.chars().count());
    if p_len + r_len > room {
        let r_room = r_len.min((room * 2 / 5).max(room.saturating_sub(p_len)));
        cut(&mut p, room - r_room);
        cut(&mut r, r_room);
    }
    format!("{p} → {r}")
}

/// Cuts `s` to at most `width` characters, the last one `…` if it was cut.
fn cut(s: &mut String, width: usize) {
    if s.chars().count() > width {
        let at = s
            .char_indices()
            .nth(width.saturating_sub(1))
            .map_or(s.len(), |(i, _)| i);
        s.truncate(at);
        s.push('…');
    }
}

/// Renders a top-level value; a value that cannot be read (which a record
/// line that parsed does not have) is shown as it is.
fn render(value: &RawValue, out: &mut String) {
    let start = out.len();
    let mut de = serde_json::Deserializer::from_str(value.get());
    let seed = Render { out, top: true };
    if seed.deserialize(&mut de).is_err() {
        out.truncate(start);
        out.push_str(value.get());
    }
    if value.get() == "null" {
        out.truncate(start);
    }
}

/// Renders one JSON value in the order it is written (a
/// `serde_json::Value` would sort the keys), borrowing strings rather than
/// copying kilobytes of base64.
struct Render<'o> {
    out: &'o mut String,
    /// Whether this is the payload or reply itself, whose braces are left
    /// out.
    top: bool,
}

impl<'de> DeserializeSeed<'de> for Render<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Render<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> std::result::Result<(), E> {
        let _ = write!(self.out, "{v}");
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> std::result::Result<(), E> {
        let _ = write!(self.out, "{v}");
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> std::result::Result<(), E> {
        let _ = write!(self.out, "{v}");
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> std::result::Result<(), E> {
        let _ = write!(self.out, "{v}");
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> std::result::Result<(), E> {
        render_str(v, self.out);
        Ok(())
    }

    fn visit_unit<E>(self) -> std::result::Result<(), E> {
        self.out.push_str("null");
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        self.out.push('[');
        let mut first = true;
        loop {
            let mark = self.out.len();
            if !first {
                self.out.push_str(", ");
            }
            let seed = Render {
                out: &mut *self.out,
                top: false,
            };
            if seq.next_element_seed(seed)?.is_none() {
                self.out.truncate(mark);
                break;
            }
            first = false;
        }
        self.out.push(']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        if !self.top {
            self.out.push('{');
        }
        let mut first = true;
        loop {
            let mark = self.out.len();
            if !first {
                self.out.push(' ');
            }
            if map.next_key_seed(Key(&mut *self.out))?.is_none() {
                self.out.truncate(mark);
                break;
            }
            self.out.push('=');
            let value = self.out.len();
            map.next_value_seed(Render {
                out: &mut *self.out,
                top: false,
            })?;
            if matches!(&self.out[value..], "null" | "[]" | "{}") {
                self.out.truncate(mark);
            } else {
                first = false;
            }
        }
        if !self.top {
            self.out.push('}');
        }
        Ok(())
    }
}

/// Writes an object key as it is.
struct Key<'o>(&'o mut String);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<(), E> {
        self.0.push_str(v);
        Ok(())
    }
}

/// A string: bulk data abbreviated, a plain word bare, anything else
/// quoted.
fn render_str(s: &str, out: &mut String) {
    if let Some(b64) = s.strip_prefix("b64:") {
        if render_b64(b64, out) {
            return;
        }
    }
    if s.starts_with("xxh3:") {
        if let Ok(Data::Hash { len, hash }) = Data::decode(s) {
            let _ = write!(out, "<{len} {}, xxh3 {:08x}…>", bytes(len), hash >> 96);
            return;
        }
    }
    let bare = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:@+".contains(&b));
    if bare {
        out.push_str(s);
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// `b64:` data as `<LEN bytes>`, with the bytes in hex when they are few.
/// Returns false (writing nothing) if it is not base64.
fn render_b64(b64: &str, out: &mut String) -> bool {
    if b64.len() % 4 != 0 {
        return false;
    }
    // Base64 of HEX_MAX bytes, rounded up to whole quads.
    if b64.len() <= HEX_MAX.div_ceil(3) * 4 {
        let Ok(Data::Bytes(b)) = Data::decode(&format!("b64:{b64}")) else {
            return false;
        };
        let _ = write!(out, "<{} {}", b.len(), bytes(b.len() as u64));
        if !b.is_empty() && b.len() <= HEX_MAX {
            out.push(' ');
            for byte in &b {
                let _ = write!(out, "{byte:02x}");
            }
        }
        out.push('>');
        return true;
    }
    // Long data is not decoded: its length follows from the text.
    let pad = b64.bytes().rev().take(2).filter(|&b| b == b'=').count();
    let len = b64.len() / 4 * 3 - pad;
    let _ = write!(out, "<{len} {}>", bytes(len as u64));
    true
}

fn bytes(n: u64) -> &'static str {
    if n == 1 {
        "byte"
    } else {
        "bytes"
    }
}

/// Latencies (ns) per actor and message type.
#[derive(Default)]
struct Stats {
    groups: BTreeMap<String, BTreeMap<String, Vec<u64>>>,
}

/// One row of the table.
struct Row {
    actor: String,
    kind: String,
    count: usize,
    p50: u64,
    p90: u64,
    p99: u64,
    max: u64,
}

impl Row {
    /// A row for `latencies`, which it sorts.
    fn new(actor: &str, kind: &str, latencies: &mut [u64]) -> Self {
        latencies.sort_unstable();
        Row {
            actor: actor.to_string(),
            kind: kind.to_string(),
            count: latencies.len(),
            p50: percentile(latencies, 50),
            p90: percentile(latencies, 90),
            p99: percentile(latencies, 99),
            max: latencies.last().copied().unwrap_or(0),
        }
    }
}

/// The `p`th percentile of `sorted` by the nearest-rank method: the
/// smallest value that at least `p`% of the values are at or below (for
/// 1..=100, p50 is 50 and p99 is 99). 0 for no values.
fn percentile(sorted: &[u64], p: usize) -> u64 {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or(0)
}

impl Stats {
    fn add(&mut self, record: &Record<'_>) {
        let kinds = match self.groups.get_mut(&*record.to) {
            Some(kinds) => kinds,
            None => self.groups.entry(record.to.to_string()).or_default(),
        };
        match kinds.get_mut(&*record.kind) {
            Some(latencies) => latencies.push(record.latency),
            None => {
                kinds.insert(record.kind.to_string(), vec![record.latency]);
            }
        }
    }

    /// The rows: one per actor and type, one per actor with more than one
    /// type (`(all)`), and the total (`all`/`all`) when there is more than
    /// one actor.
    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let mut all = Vec::new();
        for (actor, kinds) in &self.groups {
            let mut actor_all = Vec::new();
            for (kind, latencies) in kinds {
                rows.push(Row::new(actor, kind, &mut latencies.clone()));
                actor_all.extend_from_slice(latencies);
            }
            if kinds.len() > 1 {
                rows.push(Row::new(actor, "(all)", &mut actor_all));
            }
            all.append(&mut actor_all);
        }
        if self.groups.len() > 1 {
            rows.push(Row::new("all", "all", &mut all));
        }
        rows
    }

    fn write_table(&self, out: &mut dyn Write, summary: &InspectSummary) -> io::Result<()> {
        let rows = self.rows();
        let actor = rows
            .iter()
            .map(|r| r.actor.chars().count())
            .chain(["actor".len()])
            .max()
            .unwrap_or(0);
        let kind = rows
            .iter()
            .map(|r| r.kind.chars().count())
            .chain(["type".len()])
            .max()
            .unwrap_or(0);
        writeln!(
            out,
            "{:<actor$}  {:<kind$}  {:>9}  {:>10}  {:>10}  {:>10}  {:>10}",
            "actor", "type", "count", "p50 µs", "p90 µs", "p99 µs", "max µs"
        )?;
        for r in &rows {
            writeln!(
                out,
                "{:<actor$}  {:<kind$}  {:>9}  {:>10}  {:>10}  {:>10}  {:>10}",
                r.actor,
                r.kind,
                r.count,
                us(r.p50),
                us(r.p90),
                us(r.p99),
                us(r.max)
            )?;
        }
        if rows.is_empty() {
            writeln!(out, "(no matching records)")?;
        }
        writeln!(
            out,
            "\n{} record(s) read, {} matched; {} gap record(s), {} record(s) dropped",
            summary.read, summary.matched, summary.gaps, summary.dropped
        )
    }

    fn write_json(&self, out: &mut dyn Write, summary: &InspectSummary) -> io::Result<()> {
        let groups: Vec<_> = self
            .rows()
            .into_iter()
            .map(|r| {
                serde_json::json!({
                    "actor": r.actor,
                    "type": r.kind,
                    "count": r.count,
                    "p50_ns": r.p50,
                    "p90_ns": r.p90,
                    "p99_ns": r.p99,
                    "max_ns": r.max,
                })
            })
            .collect();
        let value = serde_json::json!({
            "read": summary.read,
            "matched": summary.matched,
            "gaps": summary.gaps,
            "dropped": summary.dropped,
            "groups": groups,
        });
        serde_json::to_writer(&mut *out, &value).map_err(io::Error::other)?;
        writeln!(out)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use serde_json::{json, Value};
    use switchboard_runtime::recording::{
        ActorInfo, Body, Entry, JsonBody, ParsedKind, RecordKind, RecordOptions, Recorder,
    };

    use super::*;

    fn header() -> Header {
        Header::new(
            "serve blk".into(),
            DataMode::Value,
            json!({}),
            vec![
                ActorInfo {
                    id: "disk0".into(),
                    kind: "virtio-blk".into(),
                    rebuild: Some(json!({})),
                    not_replayable: None,
                },
                ActorInfo {
                    id: "uart0".into(),
                    kind: "uart-16550".into(),
                    rebuild: None,
                    not_replayable: Some("writes to a host socket".into()),
                },
            ],
        )
    }

    fn entry(time_us: u64, latency_us: u64, from: &str, to: &str, kind: &'static str) -> Entry {
        Entry {
            time: time_us * 1000,
            latency: latency_us * 1000,
            from: Arc::from(from),
            to: Arc::from(to),
            kind: match RecordKind::parse(kind) {
                ParsedKind::Known(k) => k,
                ParsedKind::Message(_) => RecordKind::Message(kind),
            },
            body: Box::new(JsonBody {
                payload: json!({ "queue": 0, "head": time_us }),
                reply: json!({ "len": 1 }),
            }),
        }
    }

    fn write_log(dir: &tempfile::TempDir, entries: Vec<Entry>) -> PathBuf {
        let path = dir.path().join("log");
        let rec = Recorder::create(&path, &header(), RecordOptions::default()).expect("create");
        for e in entries {
            rec.record(e);
        }
        rec.finish().expect("finish");
        path
    }

    /// seq 1..=12: disk0 read, disk0 write, rng0 entropy, frontend →
    /// disk0 SET_FEATURES, repeating.
    fn mixed_log(dir: &tempfile::TempDir) -> PathBuf {
        let entries = (0..12)
            .map(|i| match i % 4 {
                0 => entry(i, 10, "driver/q0", "disk0", "read"),
                1 => entry(i, 10, "driver/q0", "disk0", "write"),
                2 => entry(i, 10, "driver/q0", "rng0", "entropy"),
                _ => entry(i, 10, "frontend", "disk0", "SET_FEATURES"),
            })
            .collect();
        write_log(dir, entries)
    }

    fn run(path: &Path, opts: &InspectOptions) -> (Result<InspectSummary>, String) {
        let mut out = Vec::new();
        let result = inspect(path, opts, &mut out);
        (result, String::from_utf8(out).expect("utf8"))
    }

    /// Whether a listing line shows a record (it starts with its seq).
    fn is_record_line(line: &str) -> bool {
        line.trim_start().starts_with(|c: char| c.is_ascii_digit())
    }

    /// The seqs `opts` selects, read from the `--json` output.
    fn seqs(path: &Path, opts: InspectOptions) -> Vec<u64> {
        let opts = InspectOptions { json: true, ..opts };
        let (result, out) = run(path, &opts);
        let summary = result.expect("inspect");
        let seqs: Vec<u64> = out
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("json line");
                v["seq"].as_u64().expect("seq")
            })
            .collect();
        assert_eq!(summary.matched, seqs.len() as u64);
        seqs
    }

    #[test]
    fn test_filters_select_exactly_the_matching_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = mixed_log(&dir);
        let all: Vec<u64> = (1..=12).collect();
        assert_eq!(seqs(&path, InspectOptions::default()), all);
        let device = |d: &str| InspectOptions {
            device: Some(d.into()),
            ..Default::default()
        };
        assert_eq!(seqs(&path, device("rng0")), vec![3, 7, 11]);
        assert_eq!(
            seqs(&path, device("disk0")),
            vec![1, 2, 4, 5, 6, 8, 9, 10, 12]
        );
        // `from` matches too.
        assert_eq!(seqs(&path, device("frontend")), vec![4, 8, 12]);
        assert_eq!(seqs(&path, device("disk")), Vec::<u64>::new());
        let kind = InspectOptions {
            kind: Some("write".into()),
            ..Default::default()
        };
        assert_eq!(seqs(&path, kind), vec![2, 6, 10]);
        let range = InspectOptions {
            from: Some(3),
            until: Some(9),
            ..Default::default()
        };
        assert_eq!(seqs(&path, range), vec![3, 4, 5, 6, 7, 8, 9]);
        let both = InspectOptions {
            device: Some("disk0".into()),
            kind: Some("read".into()),
            from: Some(2),
            until: Some(9),
            ..Default::default()
        };
        assert_eq!(seqs(&path, both), vec![5, 9]);
    }

    #[test]
    fn test_listing_shows_the_header_and_one_aligned_line_per_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = mixed_log(&dir);
        let opts = InspectOptions {
            until: Some(4),
            ..Default::default()
        };
        let (result, out) = run(&path, &opts);
        assert_eq!(result.expect("inspect").matched, 4);
        assert!(out.contains("command  serve blk"), "{out}");
        assert!(out.contains("format   switchboard-log version 1"), "{out}");
        assert!(out.contains("disk0  virtio-blk  replayable"), "{out}");
        assert!(
            out.contains("uart0  uart-16550  not replayable: writes to a host socket"),
            "{out}"
        );
        let lines: Vec<&str> = out.lines().filter(|l| l.contains(" → ")).collect();
        // The column line and 4 records.
        assert_eq!(lines.len(), 5, "{out}");
        // (A `JsonBody` writes its keys sorted.)
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            [
                "2",
                "0.001",
                "10.0",
                "driver/q0",
                "→",
                "disk0",
                "write",
                "head=1",
                "queue=0",
                "→",
                "len=1"
            ],
        );
        // In characters: the column line has a two-byte "µ".
        let arrows: Vec<usize> = lines
            .iter()
            .map(|l| l.chars().position(|c| c == '→').expect("arrow"))
            .collect();
        assert!(arrows.iter().all(|&a| a == arrows[0]), "{out}");
    }

    #[test]
    fn test_stats_give_nearest_rank_percentiles_per_actor_and_type() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Latencies 1..=100 µs for disk0 reads, out of order; 3 rng0
        // records of 7 µs.
        let mut entries: Vec<Entry> = (0..100)
            .map(|i| entry(i, i * 37 % 100 + 1, "driver/q0", "disk0", "read"))
            .collect();
        entries.extend((0..3).map(|i| entry(100 + i, 7, "driver/q0", "rng0", "entropy")));
        let path = write_log(&dir, entries);
        let opts = InspectOptions {
            stats: true,
            json: true,
            ..Default::default()
        };
        let (result, out) = run(&path, &opts);
        let summary = result.expect("inspect");
        assert_eq!((summary.read, summary.matched), (103, 103));
        let v: Value = serde_json::from_str(&out).expect("json");
        let groups = v["groups"].as_array().expect("groups");
        let find = |actor: &str, kind: &str| {
            groups
                .iter()
                .find(|g| g["actor"] == actor && g["type"] == kind)
                .unwrap_or_else(|| panic!("no {actor}/{kind} in {out}"))
        };
        let read = find("disk0", "read");
        assert_eq!(read["count"], 100);
        assert_eq!(read["p50_ns"], 50_000);
        assert_eq!(read["p90_ns"], 90_000);
        assert_eq!(read["p99_ns"], 99_000);
        assert_eq!(read["max_ns"], 100_000);
        let rng = find("rng0", "entropy");
        assert_eq!(
            (rng["count"].as_u64(), rng["max_ns"].as_u64()),
            (Some(3), Some(7000))
        );
        assert_eq!(find("all", "all")["count"], 103);

        let (result, table) = run(
            &path,
            &InspectOptions {
                stats: true,
                ..Default::default()
            },
        );
        result.expect("inspect");
        assert!(
            table
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == ["disk0", "read", "100", "50.0", "90.0", "99.0", "100.0"]),
            "{table}"
        );
        assert!(
            table.contains("103 record(s) read, 103 matched; 0 gap record(s)"),
            "{table}"
        );
    }

    #[test]
    fn test_a_long_summary_keeps_room_for_the_reply() {
        let raw = |v: Value| RawValue::from_string(v.to_string()).expect("raw");
        let (payload, reply) = (raw(json!({ "a": "a".repeat(200) })), raw(json!({ "b": 1 })));
        let s = summarize(&payload, &reply, 100);
        assert_eq!(s.chars().count(), 100, "{s}");
        assert!(s.ends_with("… → b=1"), "{s}");
        let reply = raw(json!({ "b": "b".repeat(200) }));
        let s = summarize(&payload, &reply, 100);
        assert_eq!(s.chars().count(), 100, "{s}");
        // The reply gets 2/5 of the 97 characters beside the arrow.
        assert_eq!(
            s.split(" → ").nth(1).map(|r| r.chars().count()),
            Some(38),
            "{s}"
        );
        for width in 0..8 {
            summarize(&payload, &reply, width);
        }
    }

    #[test]
    fn test_percentile_of_few_values() {
        assert_eq!(percentile(&[], 50), 0);
        assert_eq!(percentile(&[5], 99), 5);
        assert_eq!(percentile(&[1, 2], 50), 1);
        assert_eq!(percentile(&[1, 2, 3, 4], 90), 4);
    }

    #[test]
    fn test_gaps_are_counted_whatever_the_device_filter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gap = Entry {
            time: 0,
            latency: 0,
            from: Arc::from("recorder"),
            to: Arc::from("recorder"),
            kind: RecordKind::Gap,
            body: Box::new(JsonBody {
                payload: json!({ "dropped": 17 }),
                reply: Value::Null,
            }),
        };
        let path = write_log(&dir, vec![entry(1, 5, "driver/q0", "disk0", "read"), gap]);
        let opts = InspectOptions {
            device: Some("disk0".into()),
            ..Default::default()
        };
        let (result, out) = run(&path, &opts);
        let summary = result.expect("inspect");
        assert_eq!((summary.matched, summary.gaps, summary.dropped), (1, 1, 17));
        assert!(
            out.contains("1 gap record(s) in range: 17 record(s) were dropped"),
            "{out}"
        );
        let (result, out) = run(&path, &InspectOptions::default());
        result.expect("inspect");
        assert!(
            out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "2",
                    "0.000",
                    "0.0",
                    "recorder",
                    "→",
                    "recorder",
                    "gap",
                    "dropped=17"
                ]),
            "{out}"
        );
        assert!(out.ends_with("dropped=17\n\nnote: 1 gap record(s) in range: 17 record(s) were dropped while recording and are missing here\n"), "{out}");
    }

    /// A body written as given, in its field order (a `JsonBody` sorts
    /// the keys), as the devices' request records are.
    struct RawBody(String, String);

    impl Body for RawBody {
        fn payload(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
            out.extend_from_slice(self.0.as_bytes());
            Ok(())
        }

        fn reply(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
            out.extend_from_slice(self.1.as_bytes());
            Ok(())
        }
    }

    #[test]
    fn test_bulk_data_is_abbreviated_in_field_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = vec![0xabu8; 4096];
        let hashed = Data::capture(DataMode::Hash, &big);
        let payload = format!(
            "{{\"queue\":0,\"head\":0,\"readable\":[16],\"writable\":[4096,1],\
             \"reads\":[{{\"at\":0,\"data\":\"{}\"}}],\
             \"inputs\":[{{\"what\":\"file-read\",\"at\":0,\"len\":4096,\"data\":\"{}\"}},\
             {{\"what\":\"a b\",\"data\":\"{}\"}}]}}",
            Data::Bytes(vec![1, 0, 0, 0]).encode(),
            Data::Bytes(big.clone()).encode(),
            hashed.encode(),
        );
        let reply = format!(
            "{{\"len\":4097,\"writes\":[],\"effects\":[],\"status\":\"{}\"}}",
            Data::Bytes(vec![0]).encode()
        );
        let raw = |s: &str| RawValue::from_string(s.to_string()).expect("raw");
        let short = format!("{:08x}", hashed.content_hash() >> 96);
        assert_eq!(
            summarize(&raw(&payload), &raw(&reply), 1000),
            format!(
                "queue=0 head=0 readable=[16] writable=[4096, 1] \
                 reads=[{{at=0 data=<4 bytes 01000000>}}] \
                 inputs=[{{what=file-read at=0 len=4096 data=<4096 bytes>}}, \
                 {{what=\"a b\" data=<4096 bytes, xxh3 {short}…>}}] \
                 → len=4097 status=<1 byte 00>"
            )
        );
        assert_eq!(summarize(&raw("{}"), &raw("null"), 1000), "-");
        assert_eq!(
            summarize(&raw("\"b64:\""), &raw("[]"), 1000),
            "<0 bytes> → []"
        );

        let path = write_log(
            &dir,
            vec![Entry {
                time: 0,
                latency: 0,
                from: Arc::from("driver/q0"),
                to: Arc::from("disk0"),
                kind: RecordKind::Message("read"),
                body: Box::new(RawBody(payload, reply)),
            }],
        );
        let (result, out) = run(&path, &InspectOptions::default());
        result.expect("inspect");
        let line = out.lines().last().expect("a line");
        assert!(line.contains("  read  "), "{line}");
        assert!(!line.contains("b64:"), "{line}");
        assert!(line.ends_with("… → len=4097 status=<1 byte 00>"), "{line}");
        let summary = &line[line.find("queue=").expect("summary")..];
        assert_eq!(summary.chars().count(), SUMMARY_WIDTH, "{line}");
    }

    #[test]
    fn test_a_truncated_log_prints_the_prefix_then_names_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_log(
            &dir,
            (0..10)
                .map(|i| entry(i, 1, "driver/q0", "disk0", "read"))
                .collect(),
        );
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, &text[..text.len() - 10]).expect("write");
        let (result, out) = run(&path, &InspectOptions::default());
        let err = result.expect_err("truncated");
        assert!(
            matches!(
                err,
                InspectError::ReadLog(LogError::Truncated {
                    line: 11,
                    complete: 9,
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(!err.is_closed_output());
        assert!(
            err.to_string().contains(":11: the log ends in the middle"),
            "{err}"
        );
        let records = out.lines().filter(|l| is_record_line(l)).count();
        assert_eq!(records, 9, "{out}");
        // Stopping before the cut reads no further.
        let opts = InspectOptions {
            until: Some(9),
            ..Default::default()
        };
        assert_eq!(run(&path, &opts).0.expect("inspect").matched, 9);
        let stats = InspectOptions {
            stats: true,
            ..Default::default()
        };
        let (result, out) = run(&path, &stats);
        assert!(result.is_err());
        assert!(out.contains("9 record(s) read"), "{out}");
    }

    #[test]
    fn test_a_malformed_line_is_named_by_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = mixed_log(&dir);
        let text = std::fs::read_to_string(&path).expect("read");
        let mut lines: Vec<&str> = text.lines().collect();
        lines[3] = "{\"seq\": 3, \"oops\": true}";
        std::fs::write(&path, lines.join("\n") + "\n").expect("write");
        let (result, out) = run(&path, &InspectOptions::default());
        let err = result.expect_err("malformed");
        assert!(
            err.to_string()
                .starts_with(&format!("{}:4: not a record", path.display())),
            "{err}"
        );
        assert_eq!(out.lines().filter(|l| is_record_line(l)).count(), 2);
    }

    #[test]
    fn test_json_lines_are_the_log_lines_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = mixed_log(&dir);
        let opts = InspectOptions {
            json: true,
            ..Default::default()
        };
        let (result, out) = run(&path, &opts);
        result.expect("inspect");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(out, text.split_once('\n').expect("header").1);
        for line in out.lines() {
            let v: Value = serde_json::from_str(line).expect("json");
            assert!(v["type"].is_string());
        }
    }

    /// Output whose reader went away.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn test_a_closed_output_is_reported_as_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = mixed_log(&dir);
        let err = inspect(&path, &InspectOptions::default(), &mut Closed).expect_err("closed");
        assert!(err.is_closed_output(), "{err:?}");
    }

    #[test]
    fn test_start_time_is_shown_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20.123 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000 UTC");
    }
}
