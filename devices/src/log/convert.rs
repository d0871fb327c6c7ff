// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard log --convert`: a log written again in the other form,
//! record for record.
//!
//! [`convert`] reads a log of either form with its [`LogReader`] and writes
//! every record, in order, in the form asked for: the same header (but its
//! `version`, which is the form's), the same `seq`, `time`, `latency`,
//! names, payload and reply. A virtio request written to the binary form
//! gets codec 1 (`runtime/LOG-FORMAT.md`) when that renders back to the
//! very same JSON, codec 0 otherwise; so a JSON Lines log converted to
//! binary and back is the same file, line for line.
//!
//! The output is created, never overwritten. A damaged input (cut off, a
//! record that fails its checksum or does not parse) is converted up to
//! the damage; the error then names the damaged record.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use switchboard_runtime::recording::binary::{self, CODEC_JSON};
use switchboard_runtime::recording::shape::{FrameEncoder, Names, RecordParts, Spans};
use switchboard_runtime::recording::{render_line, LogError, LogFormat, LogReader};

/// What [`convert`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvertSummary {
    /// The input's form.
    pub from: LogFormat,
    /// The output's form.
    pub to: LogFormat,
    /// Records written.
    pub records: u64,
    /// Bytes written, header included.
    pub bytes: u64,
}

/// Why a log could not be converted (in full).
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The input cannot be opened, or is not a log: nothing was written.
    #[error(transparent)]
    OpenLog(LogError),
    /// The output exists, or cannot be created.
    #[error("Create {}", path.display())]
    CreateOutput {
        /// The output.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the output failed.
    #[error("Write {}", path.display())]
    WriteOutput {
        /// The output.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The input is damaged: the records before the damage were converted.
    #[error("{error}")]
    Damaged {
        /// The damage, naming its record.
        #[source]
        error: LogError,
        /// What was written before it.
        written: ConvertSummary,
    },
}

/// The result of [`convert`].
pub type Result<T> = std::result::Result<T, ConvertError>;

/// The other form than `format`.
pub fn other(format: LogFormat) -> LogFormat {
    match format {
        LogFormat::JsonLines => LogFormat::Binary,
        LogFormat::Binary => LogFormat::JsonLines,
    }
}

/// The output log: its file, and the binary form's names and shapes.
struct Out {
    path: PathBuf,
    file: BufWriter<File>,
    to: LogFormat,
    bytes: u64,
    enc: FrameEncoder,
    frame: Vec<u8>,
    body: Vec<u8>,
    values: Spans,
    /// A binary body of another codec than JSON, rendered.
    rendered: (Vec<u8>, Vec<u8>),
}

impl Out {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.bytes += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(|source| ConvertError::WriteOutput {
                path: self.path.clone(),
                source,
            })
    }

    /// One record in the binary form. A JSON body (`payload`, `reply`) is
    /// encoded again; so is a binary one, through its JSON form, so that
    /// its values are known (a log of an older version is written in this
    /// one's).
    fn record(
        &mut self,
        seq: u64,
        time: u64,
        latency: u64,
        names: [&str; 3],
        body: Body<'_>,
    ) -> Result<()> {
        let mut rendered = std::mem::take(&mut self.rendered);
        let (payload, reply) = match body {
            Body::Json(payload, reply) => (payload, reply),
            Body::Binary(CODEC_JSON, body) => {
                binary::get_json_body(body).unwrap_or(("null", "null"))
            }
            Body::Binary(codec, body) => {
                let (p, q) = (&mut rendered.0, &mut rendered.1);
                p.clear();
                q.clear();
                match crate::vhost_user::render_body(codec, body, p, q) {
                    Ok(()) => (
                        std::str::from_utf8(p).unwrap_or("null"),
                        std::str::from_utf8(q).unwrap_or("null"),
                    ),
                    Err(_) => ("null", "null"),
                }
            }
        };
        let mut scratch = std::mem::take(&mut self.body);
        scratch.clear();
        self.values.begin(0);
        let codec =
            match crate::vhost_user::encode_body(payload, reply, &mut scratch, &mut self.values) {
                Some(codec) => codec,
                None => {
                    // No structure to share: the whole body is one value.
                    scratch.clear();
                    self.values.json_body(payload.as_bytes(), reply.as_bytes());
                    CODEC_JSON
                }
            };
        let mut frame = std::mem::take(&mut self.frame);
        frame.clear();
        self.enc.record(
            &mut frame,
            &RecordParts {
                seq,
                time,
                latency,
                names: Names::Given(names.map(str::as_bytes)),
                codec,
                fixed: &scratch,
                cuts: self.values.cuts(),
                values: self.values.values(),
            },
        );
        let written = self.write(&frame);
        self.frame = frame;
        self.body = scratch;
        self.rendered = rendered;
        written
    }
}

/// A record's body as read.
enum Body<'a> {
    /// A binary log's: codec and bytes.
    Binary(u8, &'a [u8]),
    /// A JSON Lines log's: payload and reply.
    Json(&'a str, &'a str),
}

/// Writes the log at `input` to `output` (which must not exist) in the
/// form `to`.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use switchboard_devices::log::convert::convert;
/// use switchboard_runtime::recording::{
///     DataMode, Entry, Header, JsonBody, LogFormat, RecordKind, RecordOptions, Recorder,
/// };
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let (json, bin) = (dir.path().join("log"), dir.path().join("log.bin"));
/// let header = Header::new("doc".into(), DataMode::Hash, serde_json::json!({}), vec![]);
/// let recorder = Recorder::create(&json, &header, RecordOptions::default())?;
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
/// let summary = convert(&json, &bin, LogFormat::Binary)?;
/// assert_eq!((summary.from, summary.records), (LogFormat::JsonLines, 1));
/// // The output is never overwritten.
/// assert!(convert(&json, &bin, LogFormat::Binary).is_err());
/// # Ok(())
/// # }
/// ```
pub fn convert(input: &Path, output: &Path, to: LogFormat) -> Result<ConvertSummary> {
    let mut reader = super::open(input).map_err(ConvertError::OpenLog)?;
    let from = if reader.is_binary() {
        LogFormat::Binary
    } else {
        LogFormat::JsonLines
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(output)
        .map_err(|source| ConvertError::CreateOutput {
            path: output.to_path_buf(),
            source,
        })?;
    let mut out = Out {
        path: output.to_path_buf(),
        file: BufWriter::with_capacity(1 << 20, file),
        to,
        bytes: 0,
        enc: FrameEncoder::default(),
        frame: Vec::new(),
        body: Vec::new(),
        values: Spans::default(),
        rendered: Default::default(),
    };
    out.write(&reader.header().log_start(to))?;
    let mut records = 0u64;
    let damage = copy_records(&mut reader, &mut out, &mut records);
    out.file
        .flush()
        .map_err(|source| ConvertError::WriteOutput {
            path: out.path.clone(),
            source,
        })?;
    let written = ConvertSummary {
        from,
        to,
        records,
        bytes: out.bytes,
    };
    match damage? {
        None => Ok(written),
        Some(error) => Err(ConvertError::Damaged { error, written }),
    }
}

/// Copies every record; `Ok(Some)` is the damage that stopped it.
fn copy_records(
    reader: &mut LogReader,
    out: &mut Out,
    records: &mut u64,
) -> Result<Option<LogError>> {
    let render = crate::vhost_user::render_body;
    let (mut line, mut payload, mut reply) = (String::new(), Vec::new(), Vec::new());
    loop {
        let at = reader.line() + 1;
        let path = reader.path().to_path_buf();
        if reader.is_binary() {
            let r = match reader.next_binary() {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(None),
                Err(e) => return Ok(Some(e)),
            };
            match out.to {
                LogFormat::Binary => out.record(
                    r.seq,
                    r.time,
                    r.latency,
                    [r.from, r.to, r.kind],
                    Body::Binary(r.codec, r.body),
                )?,
                LogFormat::JsonLines => {
                    line.clear();
                    if let Err(why) = render_line(&mut line, &r, render, &mut payload, &mut reply) {
                        return Ok(Some(LogError::BadRecord {
                            path,
                            line: at,
                            why,
                        }));
                    }
                    line.push('\n');
                    out.write(line.as_bytes())?;
                }
            }
        } else {
            let text = match reader.next_line() {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(None),
                Err(e) => return Ok(Some(e)),
            };
            let rec = match LogReader::parse(&path, at, text) {
                Ok(r) => r,
                Err(e) => return Ok(Some(e)),
            };
            match out.to {
                LogFormat::Binary => out.record(
                    rec.seq,
                    rec.time,
                    rec.latency,
                    [&rec.from, &rec.to, &rec.kind],
                    Body::Json(rec.payload.get(), rec.reply.get()),
                )?,
                LogFormat::JsonLines => {
                    let text = text.to_string();
                    out.write(text.as_bytes())?;
                    out.write(b"\n")?;
                }
            }
        }
        *records += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use switchboard_runtime::recording::{
        DataMode, Entry, Header, JsonBody, RecordKind, RecordOptions, Recorder,
    };

    fn write_log(path: &Path, format: LogFormat, n: u64) {
        let header = Header::new("test".into(), DataMode::Hash, serde_json::json!({}), vec![]);
        let options = RecordOptions {
            format,
            ..RecordOptions::default()
        };
        let rec = Recorder::create(path, &header, options).expect("create");
        for i in 0..n {
            rec.record(Entry {
                time: i * 1000,
                latency: 7,
                from: Arc::from("driver/q0"),
                to: Arc::from(if i % 2 == 0 { "rng0" } else { "disk0" }),
                kind: RecordKind::Message("entropy"),
                body: Box::new(JsonBody {
                    payload: serde_json::json!({ "len": i }),
                    reply: serde_json::json!({ "data": "b64:AQIDBA==", "s": "a\"b" }),
                }),
            });
        }
        rec.finish().expect("finish");
    }

    #[test]
    fn test_json_to_binary_and_back_is_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("a.log");
        write_log(&json, LogFormat::JsonLines, 100);
        let bin = dir.path().join("b.bin");
        let s = convert(&json, &bin, LogFormat::Binary).expect("to binary");
        assert_eq!(
            (s.from, s.to, s.records),
            (LogFormat::JsonLines, LogFormat::Binary, 100)
        );
        assert_eq!(s.bytes, std::fs::metadata(&bin).expect("meta").len());
        assert!(LogReader::open(&bin).expect("open").is_binary());
        let back = dir.path().join("c.log");
        convert(&bin, &back, LogFormat::JsonLines).expect("to json");
        assert_eq!(
            std::fs::read_to_string(&json).expect("read"),
            std::fs::read_to_string(&back).expect("read")
        );
        // Binary to binary is the same file too.
        let again = dir.path().join("d.bin");
        convert(&bin, &again, LogFormat::Binary).expect("to binary");
        assert_eq!(
            std::fs::read(&bin).expect("read"),
            std::fs::read(&again).expect("read")
        );
    }

    #[test]
    fn test_an_existing_output_is_refused_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("a.log");
        write_log(&json, LogFormat::JsonLines, 3);
        let out = dir.path().join("b.bin");
        std::fs::write(&out, "keep me").expect("write");
        let err = convert(&json, &out, LogFormat::Binary).expect_err("exists");
        assert!(matches!(err, ConvertError::CreateOutput { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&out).expect("read"), "keep me");
    }

    #[test]
    fn test_a_damaged_log_converts_its_complete_prefix_and_names_the_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("a.bin");
        write_log(&bin, LogFormat::Binary, 10);
        let buf = std::fs::read(&bin).expect("read");
        std::fs::write(&bin, &buf[..buf.len() - 5]).expect("cut");
        let json = dir.path().join("b.log");
        let err = convert(&bin, &json, LogFormat::JsonLines).expect_err("damaged");
        let ConvertError::Damaged { error, written } = err else {
            panic!("{err}");
        };
        assert_eq!(written.records, 9);
        let msg = error.to_string();
        assert!(
            msg.contains(":11: the log ends in the middle of a record"),
            "{msg}"
        );
        let text = std::fs::read_to_string(&json).expect("read");
        assert_eq!(text.lines().count(), 10);
        assert!(text.ends_with('\n'));
    }
}
