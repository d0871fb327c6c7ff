// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Reading a log back: [`LogReader`] reads either form (JSON Lines,
//! version 1, or binary frames, versions 2 to 4) record by record, and
//! [`render_line`] turns a binary record into its version 1 line.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::shape::{BodyAt, ShapeTable, TAG_SHAPE, VERSION_SHAPES};
use super::{binary, DataMode, Header, FORMAT, FORMAT_VERSION};

/// One record as read back, borrowing from its line.
#[derive(Debug, Deserialize)]
pub struct Record<'a> {
    /// Sequence number.
    pub seq: u64,
    /// Delivery time (ns since the recording started).
    pub time: u64,
    /// Time until the reply (ns).
    #[serde(default)]
    pub latency: u64,
    /// Sender.
    #[serde(borrow)]
    pub from: std::borrow::Cow<'a, str>,
    /// Receiver.
    #[serde(borrow)]
    pub to: std::borrow::Cow<'a, str>,
    /// Message type.
    #[serde(rename = "type", borrow)]
    pub kind: std::borrow::Cow<'a, str>,
    /// Payload, unparsed.
    #[serde(borrow)]
    pub payload: &'a RawValue,
    /// Reply, unparsed.
    #[serde(borrow)]
    pub reply: &'a RawValue,
}

/// Why a log cannot be read (further).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The log.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is empty.
    #[error("{path}: empty file, not a switchboard log")]
    Empty {
        /// The log.
        path: PathBuf,
    },
    /// The first line is not a switchboard log header.
    #[error("{path}:1: not a switchboard log header: {why}")]
    NotALog {
        /// The log.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Written by a newer format version.
    #[error(
        "{path}:1: log format version {version} (written by switchboard {writer}) is newer than \
         this switchboard ({ours}) reads (version {FORMAT_VERSION}); use switchboard {writer} or newer"
    )]
    NewerVersion {
        /// The log.
        path: PathBuf,
        /// Its version.
        version: u64,
        /// The switchboard that wrote it.
        writer: String,
        /// This build's version.
        ours: &'static str,
    },
    /// The log ends in the middle of a record.
    #[error(
        "{path}:{line}: the log ends in the middle of a record (cut off after {len} bytes); \
         the {complete} complete records before it are usable"
    )]
    Truncated {
        /// The log.
        path: PathBuf,
        /// The line holding the partial record.
        line: u64,
        /// Bytes of it present.
        len: usize,
        /// Complete records before it.
        complete: u64,
    },
    /// A record of a binary log whose checksum does not match, or that
    /// does not decode.
    #[error(
        "{path}:{line}: record {line} (byte offset {offset}) is corrupt: {why}; \
         the {complete} complete records before it are usable"
    )]
    Corrupt {
        /// The log.
        path: PathBuf,
        /// The record's position, counting the header as 1 (its line in
        /// the JSON Lines form).
        line: u64,
        /// Where its frame starts in the file.
        offset: u64,
        /// What is wrong.
        why: String,
        /// Complete records before it.
        complete: u64,
    },
    /// A line that is not a record.
    #[error("{path}:{line}: not a record: {why}")]
    BadRecord {
        /// The log.
        path: PathBuf,
        /// The line.
        line: u64,
        /// What is wrong.
        why: String,
    },
}

/// Renders a binary body of `codec` as version 1's JSON payload and
/// reply. The reader knows [`binary::CODEC_JSON`]; the crate that owns
/// another codec supplies this ([`LogReader::with_render`]).
pub type Render =
    fn(codec: u8, body: &[u8], payload: &mut Vec<u8>, reply: &mut Vec<u8>) -> Result<(), String>;

fn render_none(codec: u8, _: &[u8], _: &mut Vec<u8>, _: &mut Vec<u8>) -> Result<(), String> {
    Err(format!("body codec {codec} is not known to this reader"))
}

/// One record of a binary log, borrowed from the reader.
#[derive(Clone, Copy, Debug)]
pub struct BinRecord<'a> {
    /// Sequence number.
    pub seq: u64,
    /// Delivery time (ns since the recording started).
    pub time: u64,
    /// Time until the reply (ns).
    pub latency: u64,
    /// Sender.
    pub from: &'a str,
    /// Receiver.
    pub to: &'a str,
    /// Message type.
    pub kind: &'a str,
    /// Body codec.
    pub codec: u8,
    /// Body.
    pub body: &'a [u8],
    /// The name-table indices of `from`, `to` and `kind`, in that order:
    /// a reader that keeps something per name can look it up by index
    /// instead of by string. Index `i` names the same string for the
    /// whole log.
    pub names: [u32; 3],
}

/// Reads a log, JSON Lines (version 1) or binary (versions 2 to 4), record by
/// record.
#[derive(Debug)]
pub struct LogReader {
    path: PathBuf,
    input: BufReader<File>,
    header: Header,
    line_no: u64,
    records: u64,
    buf: String,
    len: u64,
    /// The binary form's state; `None` for JSON Lines.
    bin: Option<Box<BinState>>,
}

struct BinState {
    /// Bytes read and not yet consumed: `data[pos..]`.
    data: Vec<u8>,
    pos: usize,
    /// File offset of `data[0]`.
    base: u64,
    eof: bool,
    names: Vec<String>,
    /// Decodes record heads (their `seq` and `time` may be deltas).
    coder: binary::HeadCoder,
    /// Version 4 on: the shapes met so far, and the body of the last
    /// record put together from its shape and values.
    shapes: Option<ShapeTable>,
    body: Vec<u8>,
    render: Render,
    payload: Vec<u8>,
    reply: Vec<u8>,
}

impl std::fmt::Debug for BinState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinState")
            .field("base", &self.base)
            .field("names", &self.names.len())
            .finish_non_exhaustive()
    }
}

impl LogReader {
    /// Opens `path` and reads its header, whichever form it has.
    pub fn open(path: &Path) -> Result<LogReader, LogError> {
        let io_err = |source| LogError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        let mut input = BufReader::with_capacity(1 << 20, file);
        let peek = input.fill_buf().map_err(io_err)?;
        if peek.is_empty() {
            return Err(LogError::Empty {
                path: path.to_path_buf(),
            });
        }
        if peek[0] == binary::MAGIC[0] {
            return Self::open_binary(path, input, len);
        }
        let mut first = String::new();
        input.read_line(&mut first).map_err(io_err)?;
        let header = parse_header(path, &first)?;
        Ok(LogReader {
            path: path.to_path_buf(),
            input,
            header,
            line_no: 1,
            records: 0,
            buf: String::new(),
            len,
            bin: None,
        })
    }

    /// Sets how binary bodies of codecs other than JSON are rendered for
    /// [`LogReader::next_line`].
    pub fn with_render(mut self, render: Render) -> Self {
        if let Some(b) = &mut self.bin {
            b.render = render;
        }
        self
    }

    fn open_binary(path: &Path, input: BufReader<File>, len: u64) -> Result<LogReader, LogError> {
        let not_a_log = |why: String| LogError::NotALog {
            path: path.to_path_buf(),
            why,
        };
        let mut r = LogReader {
            path: path.to_path_buf(),
            input,
            header: Header::new(
                String::new(),
                DataMode::Hash,
                serde_json::Value::Null,
                Vec::new(),
            ),
            line_no: 0,
            records: 0,
            buf: String::new(),
            len,
            bin: Some(Box::new(BinState {
                data: Vec::with_capacity(1 << 20),
                pos: 0,
                base: 0,
                eof: false,
                names: Vec::new(),
                coder: binary::HeadCoder::default(),
                shapes: None,
                body: Vec::new(),
                render: render_none,
                payload: Vec::new(),
                reply: Vec::new(),
            })),
        };
        r.fill(binary::MAGIC.len())?;
        let b = r.bin.as_mut().expect("binary state was just set");
        if b.data.len() < binary::MAGIC.len() || b.data[..binary::MAGIC.len()] != binary::MAGIC {
            return Err(not_a_log("neither JSON nor the binary form's magic".into()));
        }
        b.pos = binary::MAGIC.len();
        let payload = match r.frame() {
            Ok(Some((p, _))) => p,
            Ok(None) | Err(_) => return Err(not_a_log("no header frame after the magic".into())),
        };
        if payload.first() != Some(&binary::TAG_HEADER) {
            return Err(not_a_log("the first frame is not the header".into()));
        }
        let text = String::from_utf8_lossy(&payload[1..]).into_owned();
        r.header = parse_header(path, &text)?;
        r.line_no = 1;
        if let Some(b) = r.bin.as_mut() {
            b.coder = binary::HeadCoder::new(r.header.version);
            if r.header.version >= VERSION_SHAPES {
                b.shapes = Some(ShapeTable::default());
            }
        }
        Ok(r)
    }

    /// Makes at least `want` bytes available past `pos` unless the file
    /// ends first.
    fn fill(&mut self, want: usize) -> Result<(), LogError> {
        let Some(b) = self.bin.as_mut() else {
            return Ok(());
        };
        while b.data.len() - b.pos < want && !b.eof {
            if b.pos > 0 {
                b.data.drain(..b.pos);
                b.base += b.pos as u64;
                b.pos = 0;
            }
            let chunk = self.input.fill_buf().map_err(|source| LogError::Io {
                path: self.path.clone(),
                source,
            })?;
            if chunk.is_empty() {
                b.eof = true;
                break;
            }
            let n = chunk.len();
            b.data.extend_from_slice(chunk);
            self.input.consume(n);
        }
        Ok(())
    }

    /// The next frame's payload (a copy of its bounds into `data`) and its
    /// file offset; consumed.
    fn frame(&mut self) -> Result<Option<(Vec<u8>, u64)>, LogError> {
        let (start, end, offset) = match self.frame_bounds()? {
            Some(x) => x,
            None => return Ok(None),
        };
        let b = self.bin.as_ref().expect("binary");
        Ok(Some((b.data[start..end].to_vec(), offset)))
    }

    /// Finds the next frame: payload bounds in `data`, file offset.
    fn frame_bounds(&mut self) -> Result<Option<(usize, usize, u64)>, LogError> {
        let mut want = 16;
        loop {
            self.fill(want)?;
            let b = self.bin.as_mut().expect("binary");
            let rest = &b.data[b.pos..];
            let offset = b.base + b.pos as u64;
            match binary::take_frame(rest) {
                Ok(None) => return Ok(None),
                Ok(Some((p, n))) => {
                    let start = b.pos + (p.as_ptr() as usize - rest.as_ptr() as usize);
                    let end = start + p.len();
                    b.pos += n;
                    return Ok(Some((start, end, offset)));
                }
                Err(binary::FrameError::Truncated { have }) => {
                    if b.eof {
                        return Err(LogError::Truncated {
                            path: self.path.clone(),
                            line: self.line_no + 1,
                            len: have,
                            complete: self.records,
                        });
                    }
                    // Read on: the frame is longer than what is here.
                    let mut p = rest;
                    want = match binary::get_varint(&mut p) {
                        Some(len) => (len as usize).saturating_add(20),
                        None => want * 2,
                    };
                }
                Err(binary::FrameError::Corrupt { why }) => {
                    return Err(self.corrupt(offset, why));
                }
            }
        }
    }

    fn corrupt(&self, offset: u64, why: String) -> LogError {
        LogError::Corrupt {
            path: self.path.clone(),
            line: self.line_no + 1,
            offset,
            why,
            complete: self.records,
        }
    }

    /// How this reader renders bodies of codecs other than JSON
    /// ([`LogReader::with_render`]), for [`render_line`].
    pub fn render(&self) -> Render {
        self.bin.as_ref().map_or(render_none, |b| b.render)
    }

    /// Whether the log is the binary form.
    pub fn is_binary(&self) -> bool {
        self.bin.is_some()
    }

    /// The next record of a binary log, with its names resolved, without
    /// rendering it: `Ok(None)` at the end (and always for JSON Lines).
    /// Its line is [`LogReader::line`] after the call.
    pub fn next_binary(&mut self) -> Result<Option<BinRecord<'_>>, LogError> {
        let (end, head) = loop {
            let Some((start, end, offset)) = self.frame_bounds()? else {
                return Ok(None);
            };
            let b = self.bin.as_mut().expect("binary");
            let payload = &b.data[start..end];
            let bad = match payload[0] {
                binary::TAG_NAME => {
                    let mut p = &payload[1..];
                    let index = binary::get_varint(&mut p);
                    match (index, std::str::from_utf8(p)) {
                        (Some(i), Ok(name)) if i == b.names.len() as u64 => {
                            b.names.push(name.to_string());
                            continue;
                        }
                        _ => "a name frame out of order or not UTF-8".to_string(),
                    }
                }
                TAG_SHAPE if b.shapes.is_some() => {
                    let shapes = b.shapes.as_mut().expect("checked");
                    match shapes.define(&payload[1..]) {
                        Ok(()) => continue,
                        Err(why) => why,
                    }
                }
                binary::TAG_RECORD if b.shapes.is_some() => {
                    let shapes = b.shapes.as_mut().expect("checked");
                    // The coder moves on only once the record is known good.
                    let mut coder = b.coder;
                    match shapes.record(&mut coder, payload, &mut b.body) {
                        Err(why) => why,
                        Ok((h, _)) if h.names.iter().any(|&i| i as usize >= b.names.len()) => {
                            "a record naming an undefined name".to_string()
                        }
                        Ok((h, at)) => {
                            b.coder = coder;
                            let body_at = match at {
                                BodyAt::Values(i) => Some(start + i),
                                BodyAt::Assembled => None,
                            };
                            break (end, (h.seq, h.time, h.latency, h.names, h.codec, body_at));
                        }
                    }
                }
                binary::TAG_RECORD => {
                    // The coder moves on only once the record is known good.
                    let mut coder = b.coder;
                    match coder.get(payload) {
                        None => "a record that does not decode".to_string(),
                        Some(h)
                            if [h.from, h.to, h.kind]
                                .iter()
                                .all(|&i| (i as usize) < b.names.len()) =>
                        {
                            b.coder = coder;
                            let body_at = Some(
                                start + (h.body.as_ptr() as usize - payload.as_ptr() as usize),
                            );
                            let head = (
                                h.seq,
                                h.time,
                                h.latency,
                                [h.from, h.to, h.kind],
                                h.codec,
                                body_at,
                            );
                            break (end, head);
                        }
                        Some(_) => "a record naming an undefined name".to_string(),
                    }
                }
                t => format!("unknown frame tag {t:#04x}"),
            };
            return Err(self.corrupt(offset, bad));
        };
        self.line_no += 1;
        self.records += 1;
        let b = self.bin.as_ref().expect("binary");
        let (seq, time, latency, [from, to, kind], codec, body_at) = head;
        let name = |i: u64| b.names[i as usize].as_str();
        Ok(Some(BinRecord {
            seq,
            time,
            latency,
            from: name(from),
            to: name(to),
            kind: name(kind),
            codec,
            body: match body_at {
                Some(at) => &b.data[at..end],
                None => &b.body,
            },
            // Checked against the table's length above, which a `Vec`
            // keeps below `u32::MAX` for any log a reader can hold.
            names: [from as u32, to as u32, kind as u32],
        }))
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The file's size in bytes.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// Bytes of a binary log read so far (up to the end of the last frame
    /// read); 0 for JSON Lines.
    pub fn position(&self) -> u64 {
        self.bin.as_ref().map_or(0, |b| b.base + b.pos as u64)
    }

    /// The line number of the last line read (for a binary log, the
    /// position of the last record read, counting the header as 1).
    pub fn line(&self) -> u64 {
        self.line_no
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the next line: `Ok(None)` at the end of the log; an error for
    /// a cut-off or malformed record. The line is parsed with
    /// [`LogReader::parse`].
    pub fn next_line(&mut self) -> Result<Option<&str>, LogError> {
        if self.bin.is_some() {
            return self.next_rendered();
        }
        self.buf.clear();
        let n = self
            .input
            .read_line(&mut self.buf)
            .map_err(|source| LogError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        self.line_no += 1;
        if !self.buf.ends_with('\n') {
            return Err(LogError::Truncated {
                path: self.path.clone(),
                line: self.line_no,
                len: self.buf.len(),
                complete: self.records,
            });
        }
        self.records += 1;
        Ok(Some(self.buf.trim_end_matches('\n')))
    }

    /// The next record of a binary log rendered as its JSON line.
    fn next_rendered(&mut self) -> Result<Option<&str>, LogError> {
        let path = self.path.clone();
        let line = self.line_no + 1;
        let mut text = std::mem::take(&mut self.buf);
        text.clear();
        let mut bin = self.bin.take().expect("binary");
        let (mut payload, mut reply) = (
            std::mem::take(&mut bin.payload),
            std::mem::take(&mut bin.reply),
        );
        let render = bin.render;
        self.bin = Some(bin);
        let result = match self.next_binary() {
            Ok(Some(r)) => render_line(&mut text, &r, render, &mut payload, &mut reply)
                .map(|()| true)
                .map_err(|why| LogError::BadRecord { path, line, why }),
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        };
        if let Some(b) = self.bin.as_mut() {
            b.payload = payload;
            b.reply = reply;
        }
        self.buf = text;
        match result? {
            true => Ok(Some(&self.buf)),
            false => Ok(None),
        }
    }

    /// Parses a line [`LogReader::next_line`] returned, naming `line` in
    /// the error.
    pub fn parse<'a>(path: &Path, line: u64, text: &'a str) -> Result<Record<'a>, LogError> {
        serde_json::from_str(text).map_err(|e| LogError::BadRecord {
            path: path.to_path_buf(),
            line,
            why: e.to_string(),
        })
    }
}

/// Writes `r` as its version 1 JSON line (without the newline) into
/// `out`, rendering a body of another codec than JSON with `render`.
pub fn render_line(
    out: &mut String,
    r: &BinRecord<'_>,
    render: Render,
    payload: &mut Vec<u8>,
    reply: &mut Vec<u8>,
) -> Result<(), String> {
    use std::fmt::Write as _;
    let (p, q): (&str, &str) = if r.codec == binary::CODEC_JSON {
        binary::get_json_body(r.body).ok_or("a JSON body that does not decode")?
    } else {
        payload.clear();
        reply.clear();
        render(r.codec, r.body, payload, reply)?;
        (
            std::str::from_utf8(payload).map_err(|e| e.to_string())?,
            std::str::from_utf8(reply).map_err(|e| e.to_string())?,
        )
    };
    let js = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let _ = write!(
        out,
        "{{\"seq\":{},\"time\":{},\"latency\":{},\"from\":{},\"to\":{},\"type\":{},\"payload\":{p},\"reply\":{q}}}",
        r.seq,
        r.time,
        r.latency,
        js(r.from),
        js(r.to),
        js(r.kind)
    );
    Ok(())
}

/// Parses a header line, checking format and version before the rest so
/// that a newer log is refused rather than misread.
fn parse_header(path: &Path, line: &str) -> Result<Header, LogError> {
    let not_a_log = |why: String| LogError::NotALog {
        path: path.to_path_buf(),
        why,
    };
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| not_a_log(format!("not JSON: {e}")))?;
    match v.get("format").and_then(|f| f.as_str()) {
        Some(FORMAT) => {}
        Some(other) => {
            return Err(not_a_log(format!(
                "format is {other:?}, expected {FORMAT:?}"
            )))
        }
        None => return Err(not_a_log(format!("no \"format\": {FORMAT:?} field"))),
    }
    let version = v
        .get("version")
        .and_then(|f| f.as_u64())
        .ok_or_else(|| not_a_log("no numeric \"version\" field".into()))?;
    if version > u64::from(FORMAT_VERSION) {
        return Err(LogError::NewerVersion {
            path: path.to_path_buf(),
            version,
            writer: v
                .get("switchboard")
                .and_then(|s| s.as_str())
                .unwrap_or("unknown")
                .to_string(),
            ours: env!("CARGO_PKG_VERSION"),
        });
    }
    serde_json::from_value(v).map_err(|e| not_a_log(e.to_string()))
}
