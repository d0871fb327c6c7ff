// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Message logs: the recorder that writes them and the reader that reads
//! them back.
//!
//! # Format (version 1)
//!
//! JSON Lines. The first line is the [`Header`]: `format`
//! (`"switchboard-log"`), `version`, the `switchboard` version that wrote it,
//! the command, the data mode, the topology and one entry per actor saying
//! how to rebuild it for replay (or why it cannot be). Every further line is
//! one record:
//!
//! ```json
//! {"seq":7,"time":1250000,"latency":41000,"from":"driver/q0","to":"disk0",
//!  "type":"read","payload":{...},"reply":{...}}
//! ```
//!
//! - `seq` counts records from 1, dense and increasing: it is given by the
//!   writer thread in the order records leave the buffer.
//! - `time` is when the message was delivered and `latency` how long its
//!   reply took, both in nanoseconds since the recording started.
//! - `payload` and `reply` are shaped by the message type.
//! - A record of type `gap` (from and to `recorder`) says how many records
//!   were dropped because the buffer was full (`--record-full gap`).
//!
//! Bulk data (guest memory, file contents, entropy) is a string: `b64:...`
//! holds the bytes; `xxh3:LEN:HEX` holds only their length and 128-bit XXH3
//! hash. Data of at most [`INLINE_MAX`] bytes (request headers, status
//! bytes) is always held by value, because replay decides with it.
//!
//! # Writing
//!
//! [`Recorder::record`] is called on the data path. It only moves an
//! [`Entry`] into a bounded buffer (one per recording thread, full at
//! [`RecordOptions::buffer`] records or [`BUFFER_BYTES`] bytes, whichever
//! comes first); a writer thread numbers, serializes and
//! writes it. When the buffer is full the caller either waits
//! ([`WhenFull::Wait`], nothing lost) or the entry is dropped and counted,
//! and a `gap` record takes its place ([`WhenFull::Gap`]); never a silent
//! drop.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::{Deserialize, Serialize};

pub mod binary;
mod kind;
mod reader;
pub mod shape;
mod writer;
pub use kind::{ParsedKind, RecordKind};
pub use reader::{render_line, BinRecord, LogError, LogReader, Record, Render};
pub use writer::Until;

/// The `format` field of a header.
pub const FORMAT: &str = "switchboard-log";
/// The newest format version this build reads, and the one of the
/// binary logs it writes ([`LogFormat::Binary`], `LOG-FORMAT.md`).
pub const FORMAT_VERSION: u32 = 4;
/// The version of the JSON Lines logs it writes ([`LogFormat::JsonLines`]).
pub const JSON_LINES_VERSION: u32 = 1;
/// Data of at most this many bytes is always recorded by value.
pub const INLINE_MAX: usize = 64;
/// The default number of records the buffer holds.
pub const DEFAULT_BUFFER: usize = 65_536;
/// The bytes each recording thread's buffer holds before it is full,
/// whatever [`RecordOptions::buffer`] says: by value, 65,536 records of
/// 4 KiB were 268 MB a thread, and a writer behind a slow disk let the
/// process grow by that much per queue before the device waited.
pub const BUFFER_BYTES: usize = 16 << 20;

/// How bulk data is recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataMode {
    /// The bytes themselves: a replay compares bytes and can show them, and
    /// the log grows by 4/3 of each buffer recorded (base64), and a copy
    /// is recorded both as read and as written.
    #[default]
    Value,
    /// A 128-bit hash and the length: logs stay small and recording stays
    /// cheap; a replay still checks every byte moved, through the hashes,
    /// but cannot show the bytes.
    Hash,
}

/// How a log is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Version 1: JSON Lines.
    #[default]
    JsonLines,
    /// Version 2: binary frames with a CRC32C each (`LOG-FORMAT.md`).
    Binary,
}

/// What the recorder does when its buffer is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// The data path waits for the writer: nothing is lost.
    #[default]
    Wait,
    /// The record is dropped, counted, and a `gap` record is written.
    Gap,
}

/// Recorder settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordOptions {
    /// How bulk data is recorded.
    pub data: DataMode,
    /// Records each recording thread's buffer holds (and at most
    /// [`BUFFER_BYTES`] of them).
    pub buffer: usize,
    /// What happens when it is full.
    pub when_full: WhenFull,
    /// How the log is written.
    pub format: LogFormat,
    /// How bulk data held by value is compressed in the binary form.
    pub compress: Compress,
    /// **Test only**: the stage after which a record is dropped
    /// ([`Until`]), to measure where recording's cost goes.
    pub until: Until,
}

impl Default for RecordOptions {
    fn default() -> Self {
        RecordOptions {
            data: DataMode::Value,
            buffer: DEFAULT_BUFFER,
            when_full: WhenFull::Wait,
            format: LogFormat::JsonLines,
            compress: Compress::None,
            until: Until::Whole,
        }
    }
}

/// Whether bulk data held by value is compressed in a binary log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compress {
    /// Written as it is.
    #[default]
    None,
    /// A block longer than [`INLINE_MAX`] is compressed with zstd (level
    /// [`ZSTD_LEVEL`]) on the thread that records it, and written
    /// compressed when that is shorter (`DATA 0x03`, `LOG-FORMAT.md`).
    Zstd,
}

/// The zstd level of [`Compress::Zstd`]: the fastest of the usual
/// levels, since it runs on a device's data path.
pub const ZSTD_LEVEL: i32 = 1;

/// The 128-bit XXH3 hash of `bytes` (seed 0, the default secret).
///
/// Computed by twox-hash, which picks its AVX2 or SSE2 loop when the
/// process starts on a CPU that has it: about half the instructions of
/// the SSE2-only build for a 4 KiB block, on the recording's hot path. The
/// value is XXH3-128's whatever the loop (`hash_is_xxh3_128`).
pub fn hash(bytes: &[u8]) -> u128 {
    twox_hash::XxHash3_128::oneshot(bytes)
}

/// Bulk data as recorded: the bytes, or their length and hash.
#[derive(Clone, PartialEq, Eq)]
pub enum Data {
    /// The bytes.
    Bytes(Vec<u8>),
    /// Their length and [`hash`].
    Hash {
        /// Length in bytes.
        len: u64,
        /// XXH3-128 of the bytes.
        hash: u128,
    },
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.encode())
    }
}

impl Data {
    /// `bytes` as `mode` records them (small data always by value).
    pub fn capture(mode: DataMode, bytes: &[u8]) -> Data {
        if mode == DataMode::Value || bytes.len() <= INLINE_MAX {
            Data::Bytes(bytes.to_vec())
        } else {
            Data::Hash {
                len: bytes.len() as u64,
                hash: hash(bytes),
            }
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Data::Bytes(b) => b.len() as u64,
            Data::Hash { len, .. } => *len,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hash of the bytes (computed for [`Data::Bytes`]).
    pub fn content_hash(&self) -> u128 {
        match self {
            Data::Bytes(b) => hash(b),
            Data::Hash { hash, .. } => *hash,
        }
    }

    /// Whether both stand for the same bytes: compared by value when both
    /// hold bytes, else by length and hash.
    pub fn same(&self, other: &Data) -> bool {
        match (self, other) {
            (Data::Bytes(a), Data::Bytes(b)) => a == b,
            _ => self.len() == other.len() && self.content_hash() == other.content_hash(),
        }
    }

    /// The string form: `b64:...` or `xxh3:LEN:HEX`.
    pub fn encode(&self) -> String {
        match self {
            Data::Bytes(b) => {
                let mut s = String::with_capacity(4 + b.len().div_ceil(3) * 4);
                s.push_str("b64:");
                base64::engine::general_purpose::STANDARD.encode_string(b, &mut s);
                s
            }
            Data::Hash { len, hash } => format!("xxh3:{len}:{hash:032x}"),
        }
    }

    /// Parses the string form.
    pub fn decode(s: &str) -> Result<Data, String> {
        if let Some(b) = s.strip_prefix("b64:") {
            return base64::engine::general_purpose::STANDARD
                .decode(b)
                .map(Data::Bytes)
                .map_err(|e| format!("bad base64 data: {e}"));
        }
        if let Some(rest) = s.strip_prefix("xxh3:") {
            let (len, hex) = rest
                .split_once(':')
                .ok_or_else(|| format!("bad hashed data {s:?}: expected xxh3:LEN:HEX"))?;
            let len = len
                .parse()
                .map_err(|_| format!("bad length in hashed data {s:?}"))?;
            if hex.len() != 32 {
                return Err(format!("bad hash in {s:?}: expected 32 hex digits"));
            }
            let hash = u128::from_str_radix(hex, 16)
                .map_err(|_| format!("bad hash in {s:?}: expected 32 hex digits"))?;
            return Ok(Data::Hash { len, hash });
        }
        Err(format!(
            "bad data {:?}: expected \"b64:...\" or \"xxh3:LEN:HEX\"",
            s.chars().take(40).collect::<String>()
        ))
    }
}

impl Serialize for Data {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: std::borrow::Cow<'de, str> = Deserialize::deserialize(d)?;
        Data::decode(&s).map_err(serde::de::Error::custom)
    }
}

/// An actor of the log, as the header describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActorInfo {
    /// Its id: the `to` of its records.
    pub id: String,
    /// What it is (`virtio-blk`, `uart-16550`, ...).
    pub kind: String,
    /// What replay needs to rebuild it; absent when it cannot be replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<serde_json::Value>,
    /// Why it cannot be replayed, when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_replayable: Option<String>,
}

/// The first line of a log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format version ([`FORMAT_VERSION`] when written by this build).
    pub version: u32,
    /// The switchboard version that wrote the log.
    pub switchboard: String,
    /// The command that recorded (`run FILE`, `serve blk`).
    pub command: String,
    /// When recording started, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// How bulk data is recorded.
    pub data: DataMode,
    /// The topology that was run (for `serve`, one made from its options).
    pub topology: serde_json::Value,
    /// Every actor present at the start. Actors added later are described
    /// by their `added` record.
    pub actors: Vec<ActorInfo>,
}

impl Header {
    /// A header for this build.
    pub fn new(
        command: String,
        data: DataMode,
        topology: serde_json::Value,
        actors: Vec<ActorInfo>,
    ) -> Self {
        Header {
            format: FORMAT.to_string(),
            version: FORMAT_VERSION,
            switchboard: env!("CARGO_PKG_VERSION").to_string(),
            command,
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            data,
            topology,
            actors,
        }
    }

    /// What a log of `format` starts with, this header in it with the
    /// `version` of that form: the header line (JSON Lines), or the magic
    /// and the header frame (binary).
    pub fn log_start(&self, format: LogFormat) -> Vec<u8> {
        let mut header = self.clone();
        let mut first = Vec::new();
        match format {
            LogFormat::JsonLines => {
                header.version = JSON_LINES_VERSION;
                // A header is plain data: it always serializes.
                let _ = serde_json::to_writer(&mut first, &header);
                first.push(b'\n');
            }
            LogFormat::Binary => {
                header.version = FORMAT_VERSION;
                first.extend_from_slice(&binary::MAGIC);
                binary::put_frame_with(&mut first, |o| {
                    o.push(binary::TAG_HEADER);
                    let _ = serde_json::to_writer(&mut *o, &header);
                });
            }
        }
        first
    }
}

/// The payload and reply of a record, serialized by the thread that
/// records it, into its slot. A body passed by reference
/// ([`Recorder::record_body`]) may borrow what it describes; a boxed one
/// ([`Entry::body`]) owns it.
pub trait Body: Send {
    /// Writes the payload as one JSON value.
    fn payload(&self, out: &mut Vec<u8>) -> serde_json::Result<()>;
    /// Writes the reply as one JSON value.
    fn reply(&self, out: &mut Vec<u8>) -> serde_json::Result<()>;
    /// Writes payload and reply in a binary codec of `LOG-FORMAT.md` and
    /// returns the codec, or writes nothing and returns `None` to be
    /// recorded as JSON ([`binary::CODEC_JSON`]). It writes the parts of
    /// the body that vary from record to record (its values) through
    /// `values` (which the caller has begun at `out.len()`), and the rest
    /// (its fixed bytes) to `out`: the fixed bytes and where the values
    /// were cut are the record's shape, written once per shape
    /// ([`shape`]). Called on the recording thread for binary logs: it
    /// should not allocate once its buffers have grown.
    fn encode_binary(&self, _out: &mut Vec<u8>, _values: &mut shape::Spans) -> Option<u8> {
        None
    }
}

/// A body made of two JSON values.
#[derive(Debug)]
pub struct JsonBody {
    /// The payload.
    pub payload: serde_json::Value,
    /// The reply.
    pub reply: serde_json::Value,
}

impl Body for JsonBody {
    fn payload(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        serde_json::to_writer(out, &self.payload)
    }

    fn reply(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        serde_json::to_writer(out, &self.reply)
    }
}

/// One record as a source hands it over (without its `seq`).
pub struct Entry {
    /// Delivery time, ns since the recording started ([`Recorder::now`]).
    pub time: u64,
    /// Time until the reply, in ns.
    pub latency: u64,
    /// Sender.
    pub from: Arc<str>,
    /// Receiver.
    pub to: Arc<str>,
    /// Message type.
    pub kind: RecordKind,
    /// Payload and reply.
    pub body: Box<dyn Body>,
}

impl Entry {
    /// A record whose payload and reply are JSON values.
    pub fn json(
        time: u64,
        latency: u64,
        from: Arc<str>,
        to: Arc<str>,
        kind: RecordKind,
        payload: serde_json::Value,
        reply: serde_json::Value,
    ) -> Entry {
        Entry {
            time,
            latency,
            from,
            to,
            kind,
            body: Box::new(JsonBody { payload, reply }),
        }
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("time", &self.time)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// What a finished recording wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records written (gap records included).
    pub records: u64,
    /// Records dropped because the buffer was full (in `gap` mode).
    pub dropped: u64,
    /// Bytes written, header included.
    pub bytes: u64,
}

struct Inner {
    shared: Arc<writer::Shared>,
    mode: DataMode,
    format: LogFormat,
    until: Until,
    start: Instant,
    writer: Mutex<Option<thread::JoinHandle<io::Result<Summary>>>>,
    path: PathBuf,
}

/// Writes a message log. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("path", &self.inner.path)
            .field("mode", &self.inner.mode)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Creates (or truncates) `path`, writes `header` and starts the writer
    /// thread.
    pub fn create(path: &Path, header: &Header, options: RecordOptions) -> io::Result<Recorder> {
        let file = File::create(path)?;
        Self::to_writer(Box::new(file), path, header, options)
    }

    /// As [`Recorder::create`], writing to `out`; `path` only names it.
    pub fn to_writer(
        out: Box<dyn Write + Send>,
        path: &Path,
        header: &Header,
        options: RecordOptions,
    ) -> io::Result<Recorder> {
        let mut out = BufWriter::with_capacity(1 << 18, out);
        let first = header.log_start(options.format);
        out.write_all(&first)?;
        out.flush()?;
        let shared = Arc::new(writer::Shared::new(
            options.buffer,
            options.when_full,
            options.compress,
            options.until == Until::Slot,
        ));
        let bytes = first.len() as u64;
        let format = options.format;
        let for_writer = Arc::clone(&shared);
        let writer = thread::Builder::new()
            .name("record-writer".into())
            .spawn(move || writer::write_loop(for_writer, out, format, bytes))?;
        Ok(Recorder {
            inner: Arc::new(Inner {
                shared,
                mode: options.data,
                format,
                until: options.until,
                start: Instant::now(),
                writer: Mutex::new(Some(writer)),
                path: path.to_path_buf(),
            }),
        })
    }

    /// How bulk data is recorded.
    pub fn data_mode(&self) -> DataMode {
        self.inner.mode
    }

    /// How far a record goes (test only: [`RecordOptions::until`]).
    pub fn until(&self) -> Until {
        self.inner.until
    }

    /// Nanoseconds since the recording started.
    pub fn now(&self) -> u64 {
        self.inner.start.elapsed().as_nanos() as u64
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The format it writes.
    pub fn format(&self) -> LogFormat {
        self.inner.format
    }

    /// Hands a record to the writer. Waits if this thread's buffer is
    /// full and the mode is [`WhenFull::Wait`]; drops and counts it under
    /// [`WhenFull::Gap`].
    pub fn record(&self, entry: Entry) {
        self.record_body(
            entry.time,
            entry.latency,
            &entry.from,
            &entry.to,
            entry.kind,
            &*entry.body,
        );
    }

    /// As [`Recorder::record`], with the body borrowed: encoded into this
    /// thread's buffer at once, so nothing is boxed or allocated.
    pub fn record_body(
        &self,
        time: u64,
        latency: u64,
        from: &str,
        to: &str,
        kind: RecordKind,
        body: &dyn Body,
    ) {
        let inner = &*self.inner;
        if inner.shared.ended.load(Ordering::Acquire) {
            tracing::debug!(%to, %kind, "record after the log was closed; not written");
            return;
        }
        match inner.until {
            Until::Whole | Until::Slot => {}
            Until::Capture | Until::Hash => return,
            Until::Encode => return writer::encode_only(inner.format, body),
        }
        inner
            .shared
            .record(inner.format, time, latency, [from, to, kind.as_str()], body);
    }

    /// Writes everything buffered and closes the log. Later records are
    /// not written. Safe to call more than once (later calls return the
    /// default summary).
    pub fn finish(&self) -> io::Result<Summary> {
        let inner = &*self.inner;
        inner.shared.ended.store(true, Ordering::Release);
        let Some(writer) = inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(Summary::default());
        };
        writer
            .join()
            .map_err(|_| io::Error::other("the log writer thread panicked"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn header() -> Header {
        Header::new(
            "test".into(),
            DataMode::Value,
            serde_json::json!({}),
            vec![ActorInfo {
                id: "a".into(),
                kind: "test".into(),
                rebuild: Some(serde_json::json!({})),
                not_replayable: None,
            }],
        )
    }

    pub(super) fn entry(i: u64) -> Entry {
        Entry {
            time: i,
            latency: 1,
            from: Arc::from("me"),
            to: Arc::from("a"),
            kind: RecordKind::Message("ping"),
            body: Box::new(JsonBody {
                payload: serde_json::json!({ "i": i }),
                reply: serde_json::json!("pong"),
            }),
        }
    }

    fn read_all(path: &Path) -> Result<Vec<(u64, String)>, LogError> {
        let mut r = LogReader::open(path)?;
        let mut out = Vec::new();
        loop {
            let line = r.line();
            let Some(text) = r.next_line()? else { break };
            let text = text.to_string();
            let rec = LogReader::parse(r.path(), line + 1, &text)?;
            out.push((rec.seq, rec.kind.to_string()));
        }
        Ok(out)
    }

    #[test]
    fn test_hash_is_xxh3_128() {
        // The hash is part of the log format: a log written by any build
        // must compare with any other. xxhash-rust's portable XXH3-128 is
        // the reference, at every length class of the algorithm.
        for len in [
            0usize, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 4096, 65_537,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            assert_eq!(
                hash(&bytes),
                xxhash_rust::xxh3::xxh3_128(&bytes),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn test_data_round_trips_and_small_data_stays_by_value() {
        let big = vec![7u8; 100];
        for mode in [DataMode::Value, DataMode::Hash] {
            let d = Data::capture(mode, &big);
            assert_eq!(Data::decode(&d.encode()).ok(), Some(d.clone()));
            assert!(d.same(&Data::Bytes(big.clone())));
            assert!(!d.same(&Data::Bytes(vec![7u8; 99])));
            let small = Data::capture(mode, &[1, 2, 3]);
            assert_eq!(small, Data::Bytes(vec![1, 2, 3]));
        }
        assert!(matches!(
            Data::capture(DataMode::Hash, &big),
            Data::Hash { len: 100, .. }
        ));
        assert!(Data::decode("xxh3:1:zz").is_err());
        assert!(Data::decode("hex:00").is_err());
    }

    #[test]
    fn test_records_are_numbered_in_order_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let rec = Recorder::create(&path, &header(), RecordOptions::default()).expect("create");
        for i in 0..1000 {
            rec.record(entry(i));
        }
        let summary = rec.finish().expect("finish");
        assert_eq!(summary.records, 1000);
        assert_eq!(summary.bytes, std::fs::metadata(&path).expect("meta").len());
        let got = read_all(&path).expect("read");
        assert_eq!(got.len(), 1000);
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, (seq, _))| *seq == i as u64 + 1));
    }

    /// A writer that blocks until told to go on, to fill the buffer.
    struct Gate(
        Arc<(Mutex<bool>, std::sync::Condvar)>,
        Vec<u8>,
        Arc<Mutex<Vec<u8>>>,
    );

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.1.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            let (lock, cv) = &*self.0;
            let mut open = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !*open {
                open = cv.wait(open).unwrap_or_else(|e| e.into_inner());
            }
            self.2
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&self.1);
            self.1.clear();
            Ok(())
        }
    }

    /// A writer whose flushes wait until it is opened, and that says when
    /// one is waiting.
    struct Stall {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        waiting: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Write for Stall {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !*open {
                self.waiting.store(true, Ordering::Release);
                open = cv.wait(open).unwrap_or_else(|e| e.into_inner());
            }
            Ok(())
        }
    }

    #[test]
    fn test_a_buffer_is_full_at_its_byte_limit_before_its_record_limit() {
        for format in [LogFormat::JsonLines, LogFormat::Binary] {
            let open = Arc::new((Mutex::new(true), std::sync::Condvar::new()));
            let waiting = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let out = Stall {
                open: Arc::clone(&open),
                waiting: Arc::clone(&waiting),
            };
            let options = RecordOptions {
                data: DataMode::Value,
                buffer: DEFAULT_BUFFER,
                when_full: WhenFull::Gap,
                format,
                compress: Compress::None,
                until: Until::Whole,
            };
            let rec = Recorder::to_writer(Box::new(out), Path::new("mem"), &header(), options)
                .expect("recorder");
            *open.0.lock().expect("lock") = false;
            // One record, then the writer takes it and waits in its flush,
            // with this thread's buffer empty.
            rec.record(entry(0));
            while !waiting.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            // Each a little over 1 MiB: `fit` of them reach the limit, and
            // the 12 after them are dropped.
            let block = "x".repeat(1 << 20);
            let fit = (BUFFER_BYTES >> 20) as u64;
            for i in 1..=fit + 12 {
                let mut e = entry(i);
                e.body = Box::new(JsonBody {
                    payload: serde_json::json!(block),
                    reply: serde_json::Value::Null,
                });
                rec.record(e);
            }
            *open.0.lock().expect("lock") = true;
            open.1.notify_all();
            let summary = rec.finish().expect("finish");
            assert_eq!(summary.dropped, 12, "{format:?}: {summary:?}");
            // Written: the first, the ones that fit, and the gap record.
            assert_eq!(summary.records, fit + 2, "{format:?}: {summary:?}");
        }
    }

    #[test]
    fn test_a_full_buffer_in_gap_mode_writes_a_gap_record_with_the_count() {
        for format in [LogFormat::JsonLines, LogFormat::Binary] {
            gap_mode_in(format);
        }
    }

    /// Gap mode in `format`, with records whose receiver changes now and
    /// then (a binary slot says "the same names as the last" in a byte).
    fn gap_mode_in(format: LogFormat) {
        let gate = Arc::new((Mutex::new(true), std::sync::Condvar::new()));
        let sink = Arc::new(Mutex::new(Vec::new()));
        let out = Gate(Arc::clone(&gate), Vec::new(), Arc::clone(&sink));
        let options = RecordOptions {
            data: DataMode::Hash,
            buffer: 4,
            when_full: WhenFull::Gap,
            format,
            compress: Compress::None,
            until: Until::Whole,
        };
        let rec = Recorder::to_writer(Box::new(out), Path::new("mem"), &header(), options)
            .expect("recorder");
        *gate.0.lock().expect("lock") = false;
        let to = |i: u64| if i % 3 == 0 { "b" } else { "a" };
        // The writer blocks in its first flush; the buffer then holds 4.
        let mut sent = 0;
        for i in 0..100 {
            let mut e = entry(i);
            e.to = Arc::from(to(i));
            rec.record(e);
            sent += 1;
        }
        *gate.0.lock().expect("lock") = true;
        gate.1.notify_all();
        let summary = rec.finish().expect("finish");
        assert!(summary.dropped > 0, "{format:?}: {summary:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, &*sink.lock().expect("lock")).expect("write");
        let (lines, err) = lines(&path);
        assert!(err.is_none(), "{format:?}: {err:?}");
        let records: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        let pings: Vec<_> = records.iter().filter(|v| v["type"] == "ping").collect();
        for v in &pings {
            let i = v["payload"]["i"].as_u64().expect("i");
            assert_eq!(v["to"], to(i), "{format:?}: {v}");
            assert_eq!(v["from"], "me", "{format:?}: {v}");
        }
        let gaps: u64 = records
            .iter()
            .filter(|v| v["type"] == "gap")
            .map(|v| {
                assert_eq!(v["from"], "recorder", "{v}");
                v["payload"]["dropped"].as_u64().expect("count")
            })
            .sum();
        // Every record is either written or counted in a gap record.
        assert_eq!(pings.len() as u64 + gaps, sent, "{format:?}");
        assert_eq!(gaps, summary.dropped, "{format:?}");
    }

    #[test]
    fn test_a_binary_log_holds_the_header_names_and_records_in_seq_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let options = RecordOptions {
            format: LogFormat::Binary,
            ..RecordOptions::default()
        };
        let rec = Recorder::create(&path, &header(), options).expect("create");
        // Four threads record at once: each has its own slot, and the
        // writer merges them by seq.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..500 {
                        rec.record(entry(i));
                    }
                });
            }
        });
        let summary = rec.finish().expect("finish");
        assert_eq!(summary.records, 2000);
        let buf = std::fs::read(&path).expect("read");
        assert_eq!(summary.bytes, buf.len() as u64);
        assert_eq!(buf[..8], binary::MAGIC);
        let mut at = 8;
        let mut names = Vec::new();
        let mut seqs = Vec::new();
        let mut heads = binary::HeadCoder::default();
        let mut shapes = shape::ShapeTable::default();
        let mut body = Vec::new();
        while let Some((p, n)) = binary::take_frame(&buf[at..]).expect("frame") {
            at += n;
            match p[0] {
                binary::TAG_HEADER => {
                    let h: Header = serde_json::from_slice(&p[1..]).expect("header");
                    assert_eq!(h.version, FORMAT_VERSION);
                    heads = binary::HeadCoder::new(h.version);
                }
                binary::TAG_NAME => names.push(String::from_utf8(p[2..].to_vec()).expect("utf8")),
                shape::TAG_SHAPE => shapes.define(&p[1..]).expect("shape"),
                _ => {
                    let (r, at) = shapes.record(&mut heads, p, &mut body).expect("record");
                    assert_eq!(names[r.names[2] as usize], "ping");
                    assert_eq!(names[r.names[1] as usize], "a");
                    let body = match at {
                        shape::BodyAt::Values(i) => &p[i..],
                        shape::BodyAt::Assembled => &body[..],
                    };
                    let (payload, reply) = binary::get_json_body(body).expect("json");
                    assert!(payload.starts_with("{\"i\":"), "{payload}");
                    assert_eq!(reply, "\"pong\"");
                    seqs.push(r.seq);
                }
            }
        }
        assert_eq!(seqs, (1..=2000).collect::<Vec<u64>>());
    }

    fn write_both(dir: &Path, n: u64) -> (PathBuf, PathBuf) {
        let mut paths = Vec::new();
        for format in [LogFormat::JsonLines, LogFormat::Binary] {
            let path = dir.join(format!("{format:?}"));
            let options = RecordOptions {
                format,
                ..RecordOptions::default()
            };
            let rec = Recorder::create(&path, &header(), options).expect("create");
            for i in 0..n {
                rec.record(entry(i));
            }
            rec.finish().expect("finish");
            paths.push(path);
        }
        (paths[0].clone(), paths[1].clone())
    }

    /// Every line a reader gives, then its error.
    fn lines(path: &Path) -> (Vec<String>, Option<LogError>) {
        let mut r = match LogReader::open(path) {
            Ok(r) => r,
            Err(e) => return (Vec::new(), Some(e)),
        };
        let mut out = Vec::new();
        loop {
            match r.next_line() {
                Ok(Some(l)) => out.push(l.to_string()),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[test]
    fn test_a_binary_log_reads_back_as_the_json_lines_of_the_same_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (json, bin) = write_both(dir.path(), 50);
        let (a, ea) = lines(&json);
        let (b, eb) = lines(&bin);
        assert!(ea.is_none() && eb.is_none(), "{ea:?} {eb:?}");
        // Times differ from run to run; the rest is the same.
        let strip = |l: &String| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            (
                v["seq"].clone(),
                v["type"].clone(),
                v["payload"].clone(),
                v["reply"].clone(),
            )
        };
        assert_eq!(
            a.iter().map(strip).collect::<Vec<_>>(),
            b.iter().map(strip).collect::<Vec<_>>()
        );
        let r = LogReader::open(&bin).expect("open");
        assert!(r.is_binary());
        assert_eq!(r.header().version, FORMAT_VERSION);
        assert_eq!(
            LogReader::open(&json).expect("open").header().version,
            JSON_LINES_VERSION
        );
    }

    /// Frame offsets of a binary log's records (their first byte).
    fn record_offsets(buf: &[u8]) -> Vec<(usize, u8)> {
        let mut at = binary::MAGIC.len();
        let mut out = Vec::new();
        while let Some((p, n)) = binary::take_frame(&buf[at..]).expect("frame") {
            out.push((at, p[0]));
            at += n;
        }
        out.push((at, 0));
        out
    }

    #[test]
    fn test_a_flipped_bit_in_a_payload_is_corruption_at_that_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, bin) = write_both(dir.path(), 20);
        let buf = std::fs::read(&bin).expect("read");
        let frames = record_offsets(&buf);
        let records: Vec<usize> = frames
            .iter()
            .filter(|(_, t)| *t == binary::TAG_RECORD)
            .map(|(a, _)| *a)
            .collect();
        // The 10th record (line 11), a bit in the middle of its payload.
        let at = records[9];
        let mut bad = buf.clone();
        bad[at + 12] ^= 0x10;
        std::fs::write(&bin, &bad).expect("write");
        let (got, err) = lines(&bin);
        assert_eq!(got.len(), 9);
        let msg = err.expect("an error").to_string();
        assert!(msg.contains(":11: record 11"), "{msg}");
        assert!(msg.contains(&format!("byte offset {at}")), "{msg}");
        assert!(msg.contains("checksum mismatch"), "{msg}");
        assert!(msg.contains("the 9 complete records"), "{msg}");
    }

    #[test]
    fn test_a_binary_log_cut_anywhere_in_its_last_3_records_keeps_the_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, bin) = write_both(dir.path(), 10);
        let buf = std::fs::read(&bin).expect("read");
        let frames = record_offsets(&buf);
        let records: Vec<usize> = frames
            .iter()
            .filter(|(_, t)| *t == binary::TAG_RECORD)
            .map(|(a, _)| *a)
            .collect();
        let (full, _) = lines(&bin);
        let cut_path = dir.path().join("cut");
        for cut in records[7]..buf.len() {
            std::fs::write(&cut_path, &buf[..cut]).expect("write");
            let (got, err) = lines(&cut_path);
            let complete = records.iter().filter(|&&r| r < cut).count() - 1
                + usize::from(records.contains(&cut));
            assert_eq!(got[..], full[..complete], "cut at {cut}");
            if records.contains(&cut) {
                assert!(err.is_none(), "cut at {cut}: {err:?}");
                continue;
            }
            let msg = err.expect("an error").to_string();
            let line = complete + 2;
            assert!(
                msg.contains(&format!(":{line}: the log ends in the middle of a record")),
                "cut at {cut}: {msg}"
            );
            assert!(
                msg.contains(&format!("the {complete} complete records")),
                "{msg}"
            );
        }
    }

    #[test]
    fn test_a_cut_off_log_names_the_line_and_keeps_the_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let rec = Recorder::create(&path, &header(), RecordOptions::default()).expect("create");
        for i in 0..10 {
            rec.record(entry(i));
        }
        rec.finish().expect("finish");
        let text = std::fs::read_to_string(&path).expect("read");
        let cut = text.len() - 20;
        std::fs::write(&path, &text[..cut]).expect("write");
        let mut r = LogReader::open(&path).expect("open");
        let mut complete = 0;
        let err = loop {
            match r.next_line() {
                Ok(Some(_)) => complete += 1,
                Ok(None) => panic!("no error for a cut-off log"),
                Err(e) => break e,
            }
        };
        assert_eq!(complete, 9);
        let msg = err.to_string();
        assert!(
            msg.contains(":11: the log ends in the middle of a record"),
            "{msg}"
        );
        assert!(msg.contains("the 9 complete records"), "{msg}");
    }

    #[test]
    fn test_a_version_2_binary_log_still_reads() {
        // Version 2's record heads give `seq` and `time` as they are.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v2.bin");
        let mut h = header();
        h.version = 2;
        let mut buf = binary::MAGIC.to_vec();
        binary::put_frame_with(&mut buf, |o| {
            o.push(binary::TAG_HEADER);
            serde_json::to_writer(&mut *o, &h).expect("header");
        });
        for (i, name) in ["me", "a", "ping"].iter().enumerate() {
            binary::put_frame_with(&mut buf, |o| {
                o.push(binary::TAG_NAME);
                binary::put_varint(o, i as u64);
                o.extend_from_slice(name.as_bytes());
            });
        }
        for seq in 1..=3u64 {
            let mut body = Vec::new();
            binary::put_json_body(&mut body, b"{}", b"\"pong\"");
            let head = binary::RecordHead {
                seq,
                time: 5_000_000_000 + seq,
                latency: 9,
                from: 0,
                to: 1,
                kind: 2,
                codec: binary::CODEC_JSON,
                body: &body,
            };
            binary::put_frame_with(&mut buf, |o| binary::put_record(o, &head));
        }
        std::fs::write(&path, buf).expect("write");
        let mut r = LogReader::open(&path).expect("open");
        assert_eq!(r.header().version, 2);
        let mut got = Vec::new();
        while let Some(rec) = r.next_binary().expect("record") {
            got.push((rec.seq, rec.time, rec.to.to_string(), rec.kind.to_string()));
        }
        let want: Vec<_> = (1..=3u64)
            .map(|s| (s, 5_000_000_000 + s, "a".to_string(), "ping".to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn test_a_newer_format_version_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let mut h = serde_json::to_value(header()).expect("json");
        h["version"] = serde_json::json!(FORMAT_VERSION + 1);
        h["switchboard"] = serde_json::json!("9.0.0");
        h["something_new"] = serde_json::json!(true);
        std::fs::write(&path, format!("{h}\n")).expect("write");
        let err = LogReader::open(&path).expect_err("newer version");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("log format version {}", FORMAT_VERSION + 1)),
            "{msg}"
        );
        assert!(msg.contains("switchboard 9.0.0 or newer"), "{msg}");
        std::fs::write(&path, "{\"format\":\"other\",\"version\":1}\n").expect("write");
        assert!(LogReader::open(&path)
            .expect_err("not a log")
            .to_string()
            .contains("not a switchboard log header"));
    }
}
