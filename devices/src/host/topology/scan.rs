// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Where values are in the text: a JSON scanner that maps JSON paths to lines and columns.

use super::*;

/// A JSON value's place in the text.
#[derive(Debug)]
pub(super) struct Node {
    pub(super) pos: usize,
    pub(super) body: Body,
}

#[derive(Debug)]
pub(super) enum Body {
    Scalar,
    Array(Vec<Node>),
    Object(Vec<Member>),
}

#[derive(Debug)]
pub(super) struct Member {
    pub(super) key: String,
    pub(super) key_pos: usize,
    pub(super) value: Node,
}

/// A small, lenient JSON scanner that records where each value starts.
///
/// serde_json checks the syntax; this only finds positions, so it accepts
/// anything that looks like a scalar. With `stop_at` it stops at that offset
/// and remembers the path it was in, which names the place of a syntax
/// error.
pub(super) struct Scanner<'a> {
    pub(super) text: &'a str,
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
    pub(super) stop_at: usize,
    /// The path to the value being scanned.
    pub(super) stack: Vec<Seg>,
    /// The path where scanning stopped, if it stopped early.
    pub(super) stopped: Option<Vec<Seg>>,
    /// Keys given twice in one object: the path and the second key's offset.
    pub(super) duplicates: Vec<(JsonPath, usize)>,
}

impl<'a> Scanner<'a> {
    pub(super) fn new(text: &'a str, stop_at: usize) -> Self {
        Scanner {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            stop_at,
            stack: Vec::new(),
            stopped: None,
            duplicates: Vec::new(),
        }
    }

    pub(super) fn skip_ws(&mut self) {
        while matches!(self.bytes.get(self.pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// Skips white space and says whether scanning ends here: at `stop_at`
    /// or at the end of the text. Otherwise `self.bytes[self.pos]` exists.
    pub(super) fn halt(&mut self) -> bool {
        self.skip_ws();
        if self.pos >= self.stop_at || self.pos >= self.bytes.len() {
            self.fail::<()>();
            return true;
        }
        false
    }

    pub(super) fn fail<T>(&mut self) -> Option<T> {
        if self.stopped.is_none() {
            self.stopped = Some(self.stack.clone());
        }
        None
    }

    pub(super) fn value(&mut self) -> Option<Node> {
        if self.halt() {
            return None;
        }
        let pos = self.pos;
        match self.bytes[pos] {
            b'{' => self.object(pos),
            b'[' => self.array(pos),
            b'"' => {
                self.string()?;
                Some(Node {
                    pos,
                    body: Body::Scalar,
                })
            }
            _ => {
                while let Some(b) = self.bytes.get(self.pos) {
                    if b",:]}[{\" \t\r\n".contains(b) {
                        break;
                    }
                    self.pos += 1;
                }
                if self.pos == pos {
                    return self.fail();
                }
                Some(Node {
                    pos,
                    body: Body::Scalar,
                })
            }
        }
    }

    /// Scans a string at `self.pos` and returns its value.
    pub(super) fn string(&mut self) -> Option<String> {
        let start = self.pos;
        self.pos += 1;
        loop {
            match self.bytes.get(self.pos) {
                None => return self.fail(),
                Some(b'\\') => self.pos += 2,
                Some(b'"') => break,
                Some(_) => self.pos += 1,
            }
        }
        self.pos += 1;
        let raw = self.text.get(start..self.pos)?;
        Some(
            serde_json::from_str::<String>(raw)
                .unwrap_or_else(|_| raw.trim_matches('"').to_owned()),
        )
    }

    pub(super) fn object(&mut self, pos: usize) -> Option<Node> {
        self.pos += 1;
        let mut members: Vec<Member> = Vec::new();
        if self.halt() {
            return None;
        }
        if self.bytes[self.pos] == b'}' {
            self.pos += 1;
            return Some(Node {
                pos,
                body: Body::Object(members),
            });
        }
        loop {
            if self.halt() {
                return None;
            }
            if self.bytes[self.pos] != b'"' {
                return self.fail();
            }
            let key_pos = self.pos;
            let key = self.string()?;
            if self.halt() {
                return None;
            }
            if self.bytes[self.pos] != b':' {
                return self.fail();
            }
            self.pos += 1;
            self.stack.push(Seg::Key(key.clone()));
            let value = self.value();
            self.stack.pop();
            let value = value?;
            if members.iter().any(|m| m.key == key) {
                self.duplicates
                    .push((JsonPath(self.stack.clone()).key(&key), key_pos));
            }
            members.push(Member {
                key,
                key_pos,
                value,
            });
            if self.halt() {
                return None;
            }
            match self.bytes[self.pos] {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Some(Node {
                        pos,
                        body: Body::Object(members),
                    });
                }
                _ => return self.fail(),
            }
        }
    }

    pub(super) fn array(&mut self, pos: usize) -> Option<Node> {
        self.pos += 1;
        let mut items = Vec::new();
        if self.halt() {
            return None;
        }
        if self.bytes[self.pos] == b']' {
            self.pos += 1;
            return Some(Node {
                pos,
                body: Body::Array(items),
            });
        }
        loop {
            self.stack.push(Seg::Index(items.len()));
            let item = self.value();
            self.stack.pop();
            items.push(item?);
            if self.halt() {
                return None;
            }
            match self.bytes[self.pos] {
                b',' => self.pos += 1,
                b']' => {
                    self.pos += 1;
                    return Some(Node {
                        pos,
                        body: Body::Array(items),
                    });
                }
                _ => return self.fail(),
            }
        }
    }
}

/// Where the values of a (syntactically valid) JSON text are.
pub(super) struct SourceMap<'a> {
    pub(super) text: &'a str,
    pub(super) line_starts: Vec<usize>,
    pub(super) root: Option<Node>,
    pub(super) duplicates: Vec<(JsonPath, usize)>,
}

pub(super) fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

impl<'a> SourceMap<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        let mut scanner = Scanner::new(text, usize::MAX);
        let root = scanner.value();
        SourceMap {
            text,
            line_starts: line_starts(text),
            root,
            duplicates: scanner.duplicates,
        }
    }

    /// The offset of what `anchor` names at `path`, or of the deepest value
    /// on the way that exists.
    pub(super) fn locate(&self, path: &JsonPath, anchor: Anchor) -> Option<usize> {
        if let Anchor::Offset(pos) = anchor {
            return Some(pos);
        }
        let mut node = self.root.as_ref()?;
        for (i, seg) in path.0.iter().enumerate() {
            let last = i + 1 == path.0.len();
            match (seg, &node.body) {
                (Seg::Key(k), Body::Object(members)) => {
                    // serde_json keeps the last of duplicate keys.
                    let Some(m) = members.iter().rev().find(|m| &m.key == k) else {
                        return Some(node.pos);
                    };
                    if last && anchor == Anchor::Key {
                        return Some(m.key_pos);
                    }
                    node = &m.value;
                }
                (Seg::Index(n), Body::Array(items)) => match items.get(*n) {
                    Some(item) => node = item,
                    None => return Some(node.pos),
                },
                _ => return Some(node.pos),
            }
        }
        Some(node.pos)
    }

    /// The line and column (from 1; the column in characters) of an offset.
    pub(super) fn line_col(&self, pos: usize) -> Option<(usize, usize)> {
        let line = self.line_starts.partition_point(|&s| s <= pos);
        let start = *self.line_starts.get(line.checked_sub(1)?)?;
        let column = self.text.get(start..pos)?.chars().count() + 1;
        Some((line, column))
    }
}

/// The diagnostic for a JSON syntax error: serde_json's message, line and
/// column, and the path of the object or array it is in.
pub(super) fn syntax_diagnostic(text: &str, e: &serde_json::Error) -> Diagnostic {
    let full = e.to_string();
    let message = match full.rfind(" at line ") {
        Some(i) => full[..i].to_owned(),
        None => full,
    };
    let line = e.line().max(1);
    let column = e.column().max(1);
    let stop_at = if e.classify() == serde_json::error::Category::Eof {
        text.len()
    } else {
        line_starts(text)
            .get(line - 1)
            .map_or(text.len(), |s| s + column - 1)
    };
    let mut scanner = Scanner::new(text, stop_at);
    let _ = scanner.value();
    let path = JsonPath(scanner.stopped.unwrap_or_default());
    Diagnostic {
        path: path.to_string(),
        line: Some(line),
        column: Some(column),
        message: format!("invalid JSON: {message}"),
    }
}
