// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The control socket: QMP-style JSON lines on a unix socket.
//!
//! On connect the server sends a greeting line
//! `{"QMP": {"version": {...}, "capabilities": []}}`. Then each request is
//! one line, `{"execute": "COMMAND", "arguments": {...}, "id": ANY}`
//! (`arguments` and `id` optional), and gets one reply line,
//! `{"return": VALUE}` or `{"error": {"class": "...", "desc": "..."}}`, with
//! the request's `id` echoed when given. Events are lines of their own,
//! `{"event": "NAME", "data": {...}, "timestamp": {"seconds": S,
//! "microseconds": U}}`, sent to every connected client. As in QMP,
//! `qmp_capabilities` is accepted (and not required).
//!
//! A request that is not JSON, not an object, names no command or an
//! unknown one, or has bad arguments gets an `error` reply; the connection
//! stays open. A request line longer than [`MAX_LINE`] is answered with an
//! error and skipped.
//!
//! Commands run on the connection's own thread, so a long one
//! (`device-del` waits for the device to drain, a `bus-read` waits for the
//! device's answer) holds up only that connection: other clients are
//! served meanwhile.
//!
//! [`BusAccessRequest`] is the decoded form of the `bus-read` and
//! `bus-write` commands, which reach into a bus as a guest access would.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use switchboard_runtime::{AccessOp, AccessSize, BusAddr, Refused};

use crate::host::topology::parse_unsigned;
use crate::vhost_user::check_socket_path;
use crate::vhost_user::listen::SocketFile;

/// Longest request line accepted (bytes).
pub const MAX_LINE: usize = 1 << 20;

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// QMP error class: `GenericError`, `CommandNotFound`, `DeviceNotFound`,
    /// `DeviceNotActive` (an access the device refused: it drains, stopped
    /// or failed).
    pub class: &'static str,
    /// What went wrong, for a person.
    pub desc: String,
}

impl CommandError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        CommandError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound` for `command`.
    pub fn command_not_found(command: &str) -> Self {
        CommandError {
            class: "CommandNotFound",
            desc: format!("The command {command} has not been found"),
        }
    }

    /// A `DeviceNotFound` for `id`.
    pub fn device_not_found(id: &str) -> Self {
        CommandError {
            class: "DeviceNotFound",
            desc: format!("Device '{id}' not found"),
        }
    }
}

/// The actor a control client's bus accesses come from, as journals and
/// message logs name it.
pub const CONTROL_ACTOR: &str = "ctl";

/// A `bus-read` or `bus-write` request, decoded once from its arguments:
/// `{"bus": ID, "addr": N, "size": 1|2|4|8}` and, for a write, `"value": N`,
/// each number a JSON number or a string of decimal digits or of `0x` and
/// hex digits, as in a topology file.
///
/// ```
/// # use serde_json::json;
/// # use switchboard_devices::host::control::BusAccessRequest;
/// # use switchboard_runtime::{AccessOp, AccessSize, BusAddr};
/// let args = json!({"bus": "pio0", "addr": "0x3f8", "size": 1, "value": 65});
/// let req = BusAccessRequest::parse("bus-write", args.as_object().unwrap()).unwrap();
/// assert_eq!(req.addr, BusAddr(0x3f8));
/// assert_eq!(req.size, AccessSize::B1);
/// assert_eq!(req.op, AccessOp::Write { value: 65 });
/// assert_eq!(req.to_string(), "bus-write of 1 byte at 0x3f8 on bus 'pio0'");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusAccessRequest {
    /// The bus's id.
    pub bus: String,
    /// The first address.
    pub addr: BusAddr,
    /// The width.
    pub size: AccessSize,
    /// Read, or write of a value that fits in `size`.
    pub op: AccessOp,
}

impl std::fmt::Display for BusAccessRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.size.bytes();
        write!(
            f,
            "{} of {n} byte{} at {:#x} on bus '{}'",
            match self.op {
                AccessOp::Read => "bus-read",
                AccessOp::Write { .. } => "bus-write",
            },
            if n == 1 { "" } else { "s" },
            self.addr.0,
            self.bus
        )
    }
}

/// An argument that must be an unsigned number: a JSON number, or a
/// decimal or `0x` string.
fn unsigned_argument(
    arguments: &Map<String, Value>,
    command: &str,
    name: &str,
) -> Result<u64, CommandError> {
    let value = arguments
        .get(name)
        .ok_or_else(|| CommandError::generic(format!("{command} needs '{name}'")))?;
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => parse_unsigned(s),
        _ => None,
    }
    .ok_or_else(|| {
        CommandError::generic(format!(
            "{command}: '{name}' must be an integer from 0 to 2^64-1 (a JSON number, or a \
             string of decimal digits or of 0x and hex digits), not {value}"
        ))
    })
}

impl BusAccessRequest {
    /// The command names.
    pub const COMMANDS: [&'static str; 2] = ["bus-read", "bus-write"];

    /// Decodes the arguments of `command` (`bus-read` or `bus-write`).
    /// Every error names what it can of the bus, address and size.
    pub fn parse(command: &str, arguments: &Map<String, Value>) -> Result<Self, CommandError> {
        let write = match command {
            "bus-read" => false,
            "bus-write" => true,
            other => return Err(CommandError::command_not_found(other)),
        };
        let allowed: &[&str] = if write {
            &["bus", "addr", "size", "value"]
        } else {
            &["bus", "addr", "size"]
        };
        if let Some(extra) = arguments.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(CommandError::generic(format!(
                "{command} takes only {}, not '{extra}'",
                allowed
                    .iter()
                    .map(|a| format!("'{a}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let bus = match arguments.get("bus") {
            Some(Value::String(b)) => b.clone(),
            Some(other) => {
                return Err(CommandError::generic(format!(
                    "{command}: 'bus' must be a string, not {other}"
                )))
            }
            None => return Err(CommandError::generic(format!("{command} needs 'bus'"))),
        };
        let addr = unsigned_argument(arguments, command, "addr")?;
        let bytes = unsigned_argument(arguments, command, "size")?;
        let size = AccessSize::try_from(bytes).map_err(|e| {
            CommandError::generic(format!("{command} at {addr:#x} on bus '{bus}': {e}"))
        })?;
        let op = if write {
            AccessOp::Write {
                value: unsigned_argument(arguments, command, "value")?,
            }
        } else {
            AccessOp::Read
        };
        let request = BusAccessRequest {
            bus,
            addr: BusAddr(addr),
            size,
            op,
        };
        if let AccessOp::Write { value } = op {
            if value & !size.mask() != 0 {
                return Err(CommandError::generic(format!(
                    "{request}: value {value:#x} does not fit in {} byte{}",
                    size.bytes(),
                    if size.bytes() == 1 { "" } else { "s" }
                )));
            }
        }
        Ok(request)
    }

    /// Refuses an access that does not fit in a bus of `bus_size` bytes
    /// (which may be 2^64, hence `u128`), or that runs past 2^64.
    pub fn check_within(&self, bus_size: u128) -> Result<(), CommandError> {
        let end = u128::from(self.addr.0) + u128::from(self.size.bytes());
        if end > bus_size {
            return Err(CommandError::generic(format!(
                "{self}: the access ends at {end:#x}, past the end of the bus (size {bus_size:#x})"
            )));
        }
        Ok(())
    }

    /// The error for an access the device refused (it is draining, gone or
    /// failed): class `DeviceNotActive`, naming the device when known.
    pub fn refused(&self, device: Option<&str>, refused: Refused) -> CommandError {
        CommandError {
            class: "DeviceNotActive",
            desc: match device {
                Some(d) => format!("{self}: refused by device '{d}': {refused}"),
                None => format!("{self}: refused: {refused}"),
            },
        }
    }

    /// The command-line shorthand `bus-read BUS ADDR SIZE` and `bus-write
    /// BUS ADDR SIZE VALUE` (the words after the command) as the request's
    /// arguments, each number as written (the server reads it). `None` for
    /// another command.
    ///
    /// ```
    /// # use serde_json::json;
    /// # use switchboard_devices::host::control::BusAccessRequest;
    /// let words = ["pio0", "0x3f8", "1", "65"].map(String::from);
    /// assert_eq!(
    ///     BusAccessRequest::shorthand("bus-write", &words),
    ///     Some(Ok(json!({"bus": "pio0", "addr": "0x3f8", "size": "1", "value": "65"})))
    /// );
    /// ```
    pub fn shorthand(command: &str, words: &[String]) -> Option<Result<Value, String>> {
        let names: &[&str] = match command {
            "bus-read" => &["bus", "addr", "size"],
            "bus-write" => &["bus", "addr", "size", "value"],
            _ => return None,
        };
        if words.len() != names.len() {
            let usage = names
                .iter()
                .map(|n| n.to_uppercase())
                .collect::<Vec<_>>()
                .join(" ");
            return Some(Err(format!(
                "{command} takes {usage} (or one JSON object), not {} word{}",
                words.len(),
                if words.len() == 1 { "" } else { "s" }
            )));
        }
        let arguments: Map<String, Value> = names
            .iter()
            .zip(words)
            .map(|(n, w)| ((*n).to_string(), Value::String(w.clone())))
            .collect();
        Some(Ok(Value::Object(arguments)))
    }
}

/// What the control socket drives.
pub trait Controller: Send + Sync + 'static {
    /// Runs `command` with `arguments` (an object; empty when none were
    /// given); returns the `return` value.
    fn execute(&self, command: &str, arguments: &Map<String, Value>)
        -> Result<Value, CommandError>;
    /// The commands `execute` knows, for `query-commands` and for the
    /// `CommandNotFound` check.
    fn commands(&self) -> Vec<&'static str>;
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path is unusable.
    #[error("Control socket {path}")]
    Path {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::vhost_user::Error,
    },
    /// Binding or accepting failed.
    #[error("Control socket {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

type Clients = Arc<Mutex<Vec<Arc<Mutex<UnixStream>>>>>;

/// A running control socket. Dropping it (or [`ControlServer::stop`])
/// stops accepting and removes the socket file, if the path still names
/// this socket (a file put in its place is left alone).
#[derive(Debug)]
pub struct ControlServer {
    socket: SocketFile,
    listener: UnixListener,
    clients: Clients,
    stopped: Arc<AtomicBool>,
}

fn timestamp() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

fn send_line(stream: &Mutex<UnixStream>, value: &Value) -> io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
    s.write_all(line.as_bytes())
}

impl ControlServer {
    /// Listens on `path` (refusing a path that exists and is not a stale
    /// socket) and serves `controller` on a thread per client.
    pub fn start(path: &Path, controller: Arc<dyn Controller>) -> Result<Self, Error> {
        check_socket_path(path).map_err(|source| Error::Path {
            path: path.to_path_buf(),
            source,
        })?;
        let io_err = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        // A stale socket (nobody listening) is replaced.
        let (listener, socket) = SocketFile::bind(path).map_err(io_err)?;
        let accepting = listener.try_clone().map_err(io_err)?;
        let clients: Clients = Arc::default();
        let stopped = Arc::new(AtomicBool::new(false));
        {
            let (clients, stopped) = (Arc::clone(&clients), Arc::clone(&stopped));
            thread::Builder::new()
                .name("control-accept".into())
                .spawn(move || accept_loop(&accepting, &controller, &clients, &stopped))
                .map_err(io_err)?;
        }
        Ok(ControlServer {
            socket,
            listener,
            clients,
            stopped,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// Sends an event line to every connected client.
    pub fn emit(&self, event: &str, data: Value) {
        emit(&self.clients, event, data);
    }

    /// A handle that sends events (for code that outlives a borrow).
    pub fn events(&self) -> Events {
        Events {
            clients: Arc::clone(&self.clients),
        }
    }

    /// Stops accepting, closes every client connection and removes the
    /// socket file if it is still this socket.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        // A listening socket shut down for reading fails its `accept`.
        let _ = rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Read);
        for c in self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let s = c.lock().unwrap_or_else(|e| e.into_inner());
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.socket.remove();
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends events to the control socket's clients.
#[derive(Clone, Debug)]
pub struct Events {
    clients: Clients,
}

impl Events {
    /// Sends an event line to every connected client.
    pub fn emit(&self, event: &str, data: Value) {
        emit(&self.clients, event, data);
    }
}

fn emit(clients: &Clients, event: &str, data: Value) {
    let line = json!({"event": event, "data": data, "timestamp": timestamp()});
    let mut clients = clients.lock().unwrap_or_else(|e| e.into_inner());
    // A client whose socket fails is gone: forget it.
    clients.retain(|c| send_line(c, &line).is_ok());
}

fn accept_loop(
    listener: &UnixListener,
    controller: &Arc<dyn Controller>,
    clients: &Clients,
    stopped: &AtomicBool,
) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !stopped.load(Ordering::Acquire) {
                    tracing::error!(error = %e, "control socket: accept failed; no more clients");
                }
                return;
            }
        };
        if stopped.load(Ordering::Acquire) {
            return;
        }
        let writer = match stream.try_clone() {
            Ok(w) => Arc::new(Mutex::new(w)),
            Err(e) => {
                tracing::warn!(error = %e, "control socket: set up a client");
                continue;
            }
        };
        // The greeting is sent and the client listed for events under the
        // one lock `emit` takes, so no event comes before the greeting and
        // none emitted after the client has read it is missed. (Sending
        // first and listing after lost an event emitted in between: a
        // client waiting for it waited for ever.) A few bytes on a fresh
        // socket: the write does not block while the lock is held.
        {
            let mut listed = clients.lock().unwrap_or_else(|e| e.into_inner());
            if send_line(&writer, &greeting()).is_err() {
                continue;
            }
            listed.push(Arc::clone(&writer));
        }
        let (controller, clients) = (Arc::clone(controller), Arc::clone(clients));
        let spawned = thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                serve_client(stream, &writer, controller.as_ref());
                clients
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|c| !Arc::ptr_eq(c, &writer));
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "control socket: start a client thread");
        }
    }
}

fn greeting() -> Value {
    json!({"QMP": {
        "version": {"switchboard": env!("CARGO_PKG_VERSION")},
        "capabilities": [],
    }})
}

/// Serves one client, greeted already.
fn serve_client(stream: UnixStream, writer: &Mutex<UnixStream>, controller: &dyn Controller) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let reply = if n > MAX_LINE && line.last() != Some(&b'\n') {
            // Skip the rest of the over-long line.
            let mut rest = Vec::new();
            if reader.read_until(b'\n', &mut rest).is_err() {
                return;
            }
            error_reply(
                None,
                &CommandError::generic(format!("request longer than {MAX_LINE} bytes; skipped")),
            )
        } else {
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            handle_line(text.trim(), controller)
        };
        if send_line(writer, &reply).is_err() {
            return;
        }
    }
}

fn error_reply(id: Option<Value>, e: &CommandError) -> Value {
    let mut v = json!({"error": {"class": e.class, "desc": e.desc}});
    if let (Some(id), Some(obj)) = (id, v.as_object_mut()) {
        obj.insert("id".into(), id);
    }
    v
}

/// Answers one request line.
pub fn handle_line(text: &str, controller: &dyn Controller) -> Value {
    let request: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return error_reply(
                None,
                &CommandError::generic(format!("JSON parse error: {e}")),
            )
        }
    };
    let Value::Object(mut request) = request else {
        return error_reply(
            None,
            &CommandError::generic("a request must be a JSON object"),
        );
    };
    let id = request.remove("id");
    let command = match request.remove("execute") {
        Some(Value::String(c)) => c,
        Some(_) => return error_reply(id, &CommandError::generic("'execute' must be a string")),
        None => {
            return error_reply(
                id,
                &CommandError::generic("a request needs 'execute': the command name"),
            )
        }
    };
    let arguments = match request.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => return error_reply(id, &CommandError::generic("'arguments' must be an object")),
    };
    if let Some(extra) = request.keys().next() {
        return error_reply(
            id,
            &CommandError::generic(format!("unknown request member '{extra}'")),
        );
    }
    let result = match command.as_str() {
        "qmp_capabilities" => Ok(json!({})),
        "query-commands" => {
            let mut names = controller.commands();
            names.extend(["qmp_capabilities", "query-commands"]);
            Ok(Value::Array(
                names.into_iter().map(|n| json!({"name": n})).collect(),
            ))
        }
        c if controller.commands().contains(&c) => controller.execute(c, &arguments),
        c => Err(CommandError::command_not_found(c)),
    };
    match result {
        Ok(v) => {
            let mut reply = json!({ "return": v });
            if let (Some(id), Some(obj)) = (id, reply.as_object_mut()) {
                obj.insert("id".into(), id);
            }
            reply
        }
        Err(e) => error_reply(id, &e),
    }
}

/// A client of the control socket (what `switchboard ctl` uses).
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies.
    pub events: Vec<Value>,
}

impl Client {
    /// Connects and reads the greeting.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        let writer = stream.try_clone()?;
        let mut client = Client {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = client.read_line()?;
        if greeting.get("QMP").is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a switchboard control socket: it greeted with {greeting}"),
            ));
        }
        Ok(client)
    }

    fn read_line(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the control socket closed the connection",
            ));
        }
        serde_json::from_str(&line).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad line from the control socket: {e}"),
            )
        })
    }

    /// Sends a raw request line and returns the reply (the first line that
    /// is not an event).
    pub fn request_raw(&mut self, line: &str) -> io::Result<Value> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        self.next_reply()
    }

    /// Runs `command` with `arguments`; returns the whole reply object.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> io::Result<Value> {
        let mut request = json!({ "execute": command });
        if let (Some(a), Some(obj)) = (arguments, request.as_object_mut()) {
            obj.insert("arguments".into(), a);
        }
        self.request_raw(&request.to_string())
    }

    /// Reads lines until a reply, keeping events.
    pub fn next_reply(&mut self) -> io::Result<Value> {
        loop {
            let v = self.read_line()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            return Ok(v);
        }
    }

    /// Waits for the next event line (events already received first).
    pub fn next_event(&mut self) -> io::Result<Value> {
        if !self.events.is_empty() {
            return Ok(self.events.remove(0));
        }
        self.read_line()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl Controller for Echo {
        fn execute(
            &self,
            command: &str,
            arguments: &Map<String, Value>,
        ) -> Result<Value, CommandError> {
            match command {
                "echo" => Ok(Value::Object(arguments.clone())),
                _ => Err(CommandError::generic("no")),
            }
        }

        fn commands(&self) -> Vec<&'static str> {
            vec!["echo"]
        }
    }

    #[test]
    fn test_requests_get_replies_and_bad_ones_errors() {
        let e = Echo;
        assert_eq!(
            handle_line(r#"{"execute":"echo","arguments":{"a":1},"id":7}"#, &e),
            json!({"return": {"a": 1}, "id": 7})
        );
        for (line, class, part) in [
            ("{", "GenericError", "JSON parse error"),
            ("[1]", "GenericError", "JSON object"),
            (r#"{"arguments":{}}"#, "GenericError", "'execute'"),
            (r#"{"execute":1}"#, "GenericError", "must be a string"),
            (
                r#"{"execute":"echo","arguments":[]}"#,
                "GenericError",
                "'arguments'",
            ),
            (r#"{"execute":"echo","bogus":1}"#, "GenericError", "bogus"),
            (r#"{"execute":"nope"}"#, "CommandNotFound", "nope"),
        ] {
            let r = handle_line(line, &e);
            assert_eq!(r["error"]["class"], class, "{line}: {r}");
            assert!(
                r["error"]["desc"]
                    .as_str()
                    .is_some_and(|d| d.contains(part)),
                "{line}: {r}"
            );
        }
        assert_eq!(
            handle_line(r#"{"execute":"qmp_capabilities"}"#, &e),
            json!({"return": {}})
        );
    }

    fn bus_request(command: &str, arguments: Value) -> Result<BusAccessRequest, CommandError> {
        BusAccessRequest::parse(command, arguments.as_object().expect("an object"))
    }

    #[test]
    fn test_bus_access_arguments_take_numbers_or_hex_and_decimal_strings() {
        let read = bus_request(
            "bus-read",
            json!({"bus": "mmio0", "addr": 3_489_660_928u64, "size": "4"}),
        )
        .expect("read");
        assert_eq!(
            read,
            BusAccessRequest {
                bus: "mmio0".into(),
                addr: BusAddr(0xd000_0000),
                size: AccessSize::B4,
                op: AccessOp::Read,
            }
        );
        assert_eq!(
            read.to_string(),
            "bus-read of 4 bytes at 0xd0000000 on bus 'mmio0'"
        );
        let write = bus_request(
            "bus-write",
            json!({"bus": "pio0", "addr": "0x3F8", "size": 8, "value": "0xffffffffffffffff"}),
        )
        .expect("write");
        assert_eq!(write.op, AccessOp::Write { value: u64::MAX });
    }

    #[test]
    fn test_bad_bus_access_arguments_are_refused_naming_bus_address_and_size() {
        for (command, args, part) in [
            ("bus-read", json!({"addr": 1, "size": 1}), "needs 'bus'"),
            (
                "bus-read",
                json!({"bus": 1, "addr": 1, "size": 1}),
                "'bus' must be a string",
            ),
            (
                "bus-read",
                json!({"bus": "pio0", "size": 1}),
                "needs 'addr'",
            ),
            (
                "bus-read",
                json!({"bus": "pio0", "addr": -1, "size": 1}),
                "'addr' must be",
            ),
            (
                "bus-read",
                json!({"bus": "pio0", "addr": "0x", "size": 1}),
                "'addr' must be",
            ),
            (
                "bus-read",
                json!({"bus": "pio0", "addr": 1.5, "size": 1}),
                "'addr' must be",
            ),
            (
                "bus-read",
                json!({"bus": "pio0", "addr": 1}),
                "needs 'size'",
            ),
            (
                "bus-read",
                json!({"bus": "pio0", "addr": "0x3f8", "size": 3}),
                "bus-read at 0x3f8 on bus 'pio0': Access size 3 is not 1, 2, 4 or 8",
            ),
            (
                "bus-read",
                json!({"bus": "pio0", "addr": 1, "size": 1, "value": 1}),
                "not 'value'",
            ),
            (
                "bus-write",
                json!({"bus": "pio0", "addr": 1, "size": 1}),
                "needs 'value'",
            ),
            (
                "bus-write",
                json!({"bus": "pio0", "addr": "0x3f8", "size": 1, "value": 256}),
                "bus-write of 1 byte at 0x3f8 on bus 'pio0': value 0x100 does not fit in 1 byte",
            ),
            (
                "bus-write",
                json!({"bus": "pio0", "addr": 0, "size": 4, "value": "0x100000000"}),
                "does not fit in 4 bytes",
            ),
        ] {
            let e = bus_request(command, args.clone()).expect_err("refused");
            assert_eq!(e.class, "GenericError", "{args}");
            assert!(e.desc.contains(part), "{args}: {}", e.desc);
        }
    }

    #[test]
    fn test_bus_access_past_the_end_of_the_bus_or_of_the_space_is_refused() {
        let at = |addr: u64, size: u64| {
            bus_request("bus-read", json!({"bus": "b", "addr": addr, "size": size})).expect("parse")
        };
        assert!(at(0xfffc, 4).check_within(0x10000).is_ok());
        let e = at(0xfffe, 4)
            .check_within(0x10000)
            .expect_err("past the end");
        assert_eq!(
            e.desc,
            "bus-read of 4 bytes at 0xfffe on bus 'b': the access ends at 0x10002, past the \
             end of the bus (size 0x10000)"
        );
        assert!(at(u64::MAX - 7, 8).check_within(1 << 64).is_ok());
        assert!(at(u64::MAX, 2).check_within(1 << 64).is_err());
    }

    #[test]
    fn test_a_refused_bus_access_is_device_not_active_naming_the_device() {
        let req =
            bus_request("bus-read", json!({"bus": "mmio0", "addr": 16, "size": 4})).expect("parse");
        let e = req.refused(Some("slow0"), Refused::Draining);
        assert_eq!(e.class, "DeviceNotActive");
        assert_eq!(
            e.desc,
            "bus-read of 4 bytes at 0x10 on bus 'mmio0': refused by device 'slow0': \
             Receiver is draining"
        );
    }

    #[test]
    fn test_bus_access_shorthand_takes_exactly_its_words() {
        let words = |w: &[&str]| w.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
        assert_eq!(
            BusAccessRequest::shorthand("bus-read", &words(&["pio0", "0x3f8", "1"])),
            Some(Ok(json!({"bus": "pio0", "addr": "0x3f8", "size": "1"})))
        );
        let e = BusAccessRequest::shorthand("bus-write", &words(&["pio0", "0x3f8", "1"]))
            .expect("a bus command")
            .expect_err("a word short");
        assert!(e.contains("BUS ADDR SIZE VALUE"), "{e}");
        assert_eq!(BusAccessRequest::shorthand("device-del", &[]), None);
    }

    #[test]
    fn test_the_greeting_comes_before_any_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::start(&path, Arc::new(Echo)).expect("start");
        let events = server.events();
        let stop = Arc::new(AtomicBool::new(false));
        let emitter = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    events.emit("TEST", json!({}));
                }
            })
        };
        for _ in 0..200 {
            // `connect` fails on any first line that is not the greeting.
            Client::connect(&path).expect("greeted first");
        }
        stop.store(true, Ordering::Release);
        emitter.join().expect("emitter");
    }

    #[test]
    fn test_socket_serves_clients_events_and_survives_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::start(&path, Arc::new(Echo)).expect("start");
        let mut a = Client::connect(&path).expect("connect a");
        let mut b = Client::connect(&path).expect("connect b");
        let r = a.request_raw("this is not json").expect("reply");
        assert_eq!(r["error"]["class"], "GenericError");
        let long = "x".repeat(MAX_LINE + 10);
        let r = a.request_raw(&long).expect("reply to a long line");
        assert!(r["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("longer")));
        let r = a
            .execute("echo", Some(json!({"k": "v"})))
            .expect("reply after garbage");
        assert_eq!(r, json!({"return": {"k": "v"}}));
        server.emit("TEST", json!({"n": 1}));
        let ev = b.next_event().expect("event");
        assert_eq!(ev["event"], "TEST");
        assert_eq!(ev["data"]["n"], 1);
        assert!(ev["timestamp"]["seconds"].as_u64().is_some());
        let r = b.execute("query-commands", None).expect("reply");
        assert!(r["return"]
            .as_array()
            .is_some_and(|c| c.iter().any(|x| x["name"] == "echo")));
        server.stop();
        assert!(!path.exists(), "socket left behind");
    }
}
