// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Diagnostics and JSON paths: what a check reports, and where.

use super::*;

/// One error in a topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The JSON path of the value at fault, such as
    /// `devices[2].vhost_user.socket`; empty for the whole document.
    pub path: String,
    /// The line of the value at fault (from 1), when the text is known.
    pub line: Option<usize>,
    /// The column of the value at fault (from 1, in characters), when the
    /// text is known.
    pub column: Option<usize>,
    /// What is wrong, and what was expected.
    pub message: String,
}

impl Diagnostic {
    /// The diagnostic prefixed with the file it is about:
    /// `FILE:LINE:COLUMN: PATH: MESSAGE`.
    pub fn in_file<'a>(&'a self, file: &'a Path) -> impl fmt::Display + 'a {
        InFile { diag: self, file }
    }
}

impl fmt::Display for Diagnostic {
    /// `LINE:COLUMN: PATH: MESSAGE`, leaving out what is unknown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{l}:{c}: ")?,
            (Some(l), None) => write!(f, "{l}: ")?,
            _ => {}
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Diagnostic {}

pub(super) struct InFile<'a> {
    pub(super) diag: &'a Diagnostic,
    pub(super) file: &'a Path,
}

impl fmt::Display for InFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if self.diag.line.is_some() { ":" } else { ": " };
        write!(f, "{}{sep}{}", self.file.display(), self.diag)
    }
}

/// One step of a JSON path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// A JSON path such as `devices[2].vhost_user.socket`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(super) struct JsonPath(pub(super) Vec<Seg>);

impl JsonPath {
    pub(super) fn key(&self, key: &str) -> JsonPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(key.to_owned()));
        p
    }

    pub(super) fn index(&self, i: usize) -> JsonPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    pub(super) fn join(&self, other: &JsonPath) -> JsonPath {
        let mut p = self.clone();
        p.0.extend(other.0.iter().cloned());
        p
    }

    /// Reads what `Display` writes; stops at anything it does not
    /// understand.
    pub(super) fn parse(s: &str) -> JsonPath {
        let mut segs = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix('[') {
                if r.starts_with('"') {
                    let mut keys = serde_json::Deserializer::from_str(r).into_iter::<String>();
                    let Some(Ok(key)) = keys.next() else { break };
                    let Some(after) = r
                        .get(keys.byte_offset()..)
                        .and_then(|a| a.strip_prefix(']'))
                    else {
                        break;
                    };
                    segs.push(Seg::Key(key));
                    rest = after;
                } else {
                    let Some(end) = r.find(']') else { break };
                    let Ok(i) = r[..end].parse() else { break };
                    segs.push(Seg::Index(i));
                    rest = &r[end + 1..];
                }
            } else {
                let r = rest.strip_prefix('.').unwrap_or(rest);
                let end = r.find(['.', '[']).unwrap_or(r.len());
                if end == 0 {
                    break;
                }
                segs.push(Seg::Key(r[..end].to_owned()));
                rest = &r[end..];
            }
        }
        JsonPath(segs)
    }

    pub(super) fn from_serde(path: &serde_path_to_error::Path) -> JsonPath {
        use serde_path_to_error::Segment;
        JsonPath(
            path.iter()
                .filter_map(|s| match s {
                    Segment::Seq { index } => Some(Seg::Index(*index)),
                    Segment::Map { key } => Some(Seg::Key(key.clone())),
                    Segment::Enum { .. } | Segment::Unknown => None,
                })
                .collect(),
        )
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key(k)
                    if !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
                {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Key(k) => {
                    let quoted = serde_json::to_string(k).map_err(|_| fmt::Error)?;
                    write!(f, "[{quoted}]")?;
                }
            }
        }
        Ok(())
    }
}

/// Which part of the text a finding points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Anchor {
    /// The value at the path.
    Value,
    /// The key of the value at the path (for an unknown field).
    Key,
    /// This byte offset.
    Offset(usize),
}

/// An error, before its path is located in the text.
#[derive(Clone, Debug)]
pub(super) struct Finding {
    pub(super) path: JsonPath,
    pub(super) anchor: Anchor,
    pub(super) message: String,
}

impl Finding {
    pub(super) fn at(path: JsonPath, message: impl Into<String>) -> Finding {
        Finding {
            path,
            anchor: Anchor::Value,
            message: message.into(),
        }
    }

    pub(super) fn at_key(path: JsonPath, message: impl Into<String>) -> Finding {
        Finding {
            path,
            anchor: Anchor::Key,
            message: message.into(),
        }
    }
}

/// Turns findings into diagnostics, with lines and columns when the text is
/// known, sorted by position.
pub(super) fn diagnostics(
    findings: Vec<Finding>,
    source: Option<&SourceMap<'_>>,
) -> Vec<Diagnostic> {
    let mut out: Vec<Diagnostic> = findings
        .into_iter()
        .map(|f| {
            let pos = source.and_then(|s| s.line_col(s.locate(&f.path, f.anchor)?));
            Diagnostic {
                path: f.path.to_string(),
                line: pos.map(|p| p.0),
                column: pos.map(|p| p.1),
                message: f.message,
            }
        })
        .collect();
    out.sort_by_key(|d| (d.line.unwrap_or(usize::MAX), d.column.unwrap_or(0)));
    out
}

/// What a JSON value is, for messages: `a string "x"`, `an array`.
pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) => format!("number `{n}`"),
        Value::String(s) => format!("string {}", Value::String(s.clone())),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

pub(super) fn kinds_list() -> String {
    KINDS
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
