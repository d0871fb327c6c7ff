// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Character backends for the UART: where transmitted bytes go and where
//! received bytes come from.
//!
//! A [`Sink`] is the validated-by-construction configuration; [`CharBackend::open`]
//! turns it into a live backend. The device actor owns the backend, passes it
//! every batch of bytes that [`crate::models::uart::Uart16550::take_output`] returns,
//! and reads input from the channel whose sender it handed to `open`. The
//! actor then feeds that input to the register model as
//! [`crate::models::uart::Uart16550::rx_space`] allows, so the guest sees back-pressure
//! instead of overruns. `mock::MemorySink` (feature `test-utils`) stands in
//! for a backend in tests.
//!
//! # Threads and shutdown
//!
//! - `Null`, `Stdout` and `File` start no thread.
//! - `Stdio` starts one thread that reads stdin and sends each chunk on the
//!   input channel. Dropping the backend raises its stop flag; the thread sees
//!   it after its current `read` returns and exits without sending. A read
//!   already blocked on stdin cannot be interrupted without closing the
//!   process's stdin, so that thread lingers until the next input or EOF.
//! - `UnixSocket` starts an acceptor thread (accepts one client at a time
//!   and forwards what it sends) and a writer thread (drains the output
//!   queue to the client, so a slow or stuck client never blocks the
//!   device). Dropping the backend sets `closing`, shuts the current client
//!   down (which ends a blocked `read` or `write` on it), wakes the writer,
//!   wakes the acceptor by connecting to the socket once, joins both threads
//!   and removes the socket file.
//!
//! A client that disconnects while output is in flight makes the writer's
//! `write` fail with `EPIPE`; this relies on `SIGPIPE` being ignored, as the
//! Rust runtime arranges for Rust binaries. Bytes the client did not take are
//! kept for the next client.
//!
//! The input channel reports disconnected only once the backend has been
//! dropped and its input thread has exited: the backend itself holds a
//! sender for its whole life, so a receiver never sees a spurious disconnect
//! while the device is plugged. When the input channel is bounded and full,
//! the input threads wait (re-checking their stop flag every
//! [`INPUT_STOP_POLL`]), which pushes back on the socket client.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{SendTimeoutError, Sender};
use serde::{Deserialize, Serialize};

/// Most output bytes a `UnixSocket` backend holds for delivery. Beyond it the
/// oldest bytes are dropped and counted in [`CharBackend::dropped_output`].
pub const SOCKET_BUFFER_LIMIT: usize = 64 * 1024;

/// How often an input thread blocked on a full input channel re-checks
/// whether its backend was dropped.
pub const INPUT_STOP_POLL: Duration = Duration::from_millis(100);

/// Largest chunk an input thread reads and forwards at once.
const READ_CHUNK: usize = 4096;

/// Errors of the character backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening the output file for appending failed.
    #[error("Failed to open output file {}", path.display())]
    OpenFile {
        /// The file that could not be opened.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Appending to the output file failed.
    #[error("Failed to write output file {}", path.display())]
    WriteFile {
        /// The output file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing to the process's stdout failed.
    #[error("Failed to write to stdout")]
    WriteStdout {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Looking at what is at the socket path failed.
    #[error("Failed to inspect socket path {}", path.display())]
    InspectSocketPath {
        /// The configured socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The socket path is taken by something that is not a socket; it is left
    /// untouched.
    #[error("Cannot claim socket path {}: it exists and is not a socket", path.display())]
    ClaimSocketPath {
        /// The configured socket path.
        path: PathBuf,
    },
    /// The socket path belongs to a socket another process is listening on.
    #[error("Cannot claim socket path {}: another process is listening on it", path.display())]
    ReplaceLiveSocket {
        /// The configured socket path.
        path: PathBuf,
    },
    /// Removing a stale socket file left by an earlier run failed.
    #[error("Failed to remove stale socket {}", path.display())]
    RemoveStaleSocket {
        /// The configured socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Binding the listening socket failed.
    #[error("Failed to bind socket {}", path.display())]
    BindSocket {
        /// The configured socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Starting a backend thread failed.
    #[error("Failed to spawn thread {name}")]
    SpawnThread {
        /// Name of the thread.
        name: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A write to a test backend failed; only `mock::MemorySink` produces
    /// this, when a fault was injected.
    #[error("Failed to write to memory sink")]
    WriteMemory {
        /// The injected fault.
        #[source]
        source: io::Error,
    },
}

/// Result of backend operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Where a UART's characters go, and where its input comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sink {
    /// Output is discarded; there is no input.
    Null,
    /// Output goes to the process's stdout; there is no input.
    Stdout,
    /// Output goes to stdout and input is read from stdin, as the terminal
    /// delivers it (line by line unless the caller put it in raw mode).
    Stdio,
    /// Output is appended to this file, created if missing; there is no input.
    File(PathBuf),
    /// The UART listens on this Unix socket path and serves one client at a
    /// time: the client receives the output and its bytes are the input.
    /// Output written while no client is connected is kept for the next one,
    /// up to [`SOCKET_BUFFER_LIMIT`] bytes. Further clients wait in the
    /// listen backlog until the current one disconnects.
    UnixSocket(PathBuf),
}

/// The output side of a character backend: what a UART wrapper needs to emit
/// transmitted bytes.
///
/// Lifecycle: the backend is opened before the device starts serving the
/// guest; `write` is then called from the device's actor only, in
/// transmission order, with each batch the register model produced; the
/// backend is dropped when the device is unplugged, which stops its input
/// side (see the module docs).
pub trait CharBackendT: Send {
    /// Emits `bytes`. An error means these bytes were lost; the backend stays
    /// usable, so the caller may log and carry on.
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
}

/// A live character backend opened from a [`Sink`].
///
/// ```
/// use switchboard_devices::models::uart_sink::{CharBackend, CharBackendT, Sink};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("console.log");
///
/// let (input, _input_rx) = crossbeam_channel::unbounded();
/// let mut backend = CharBackend::open(&Sink::File(path.clone()), input)?;
/// backend.write(b"login: ")?;
/// assert_eq!(std::fs::read(&path)?, b"login: ");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct CharBackend {
    output: Output,
    /// Holds the input channel open while the backend lives (see the module
    /// docs); never used to send.
    _input: Sender<Vec<u8>>,
}

#[derive(Debug)]
enum Output {
    Null,
    /// Dropping `_stdin` (present for `Stdio`) stops the stdin reader.
    Stdout {
        _stdin: Option<StdinReader>,
    },
    File {
        path: PathBuf,
        file: File,
    },
    Socket(SocketServer),
}

impl CharBackend {
    /// Opens the backend described by `sink`. Input, if the sink has any, is
    /// sent on `input` in chunks as it arrives, from a thread the backend
    /// owns.
    pub fn open(sink: &Sink, input: Sender<Vec<u8>>) -> Result<Self> {
        let output = match sink {
            Sink::Null => Output::Null,
            Sink::Stdout => Output::Stdout { _stdin: None },
            Sink::Stdio => Output::Stdout {
                _stdin: Some(StdinReader::spawn(input.clone())?),
            },
            Sink::File(path) => {
                let file = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .map_err(|source| Error::OpenFile {
                        path: path.clone(),
                        source,
                    })?;
                Output::File {
                    path: path.clone(),
                    file,
                }
            }
            Sink::UnixSocket(path) => Output::Socket(SocketServer::open(path, input.clone())?),
        };
        Ok(Self {
            output,
            _input: input,
        })
    }

    /// Output bytes dropped so far because a `UnixSocket` client was absent or
    /// too slow for longer than [`SOCKET_BUFFER_LIMIT`] bytes; 0 for the
    /// other sinks.
    pub fn dropped_output(&self) -> u64 {
        match &self.output {
            Output::Socket(server) => server.shared.lock().dropped,
            Output::Null | Output::Stdout { .. } | Output::File { .. } => 0,
        }
    }
}

impl CharBackendT for CharBackend {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.output {
            Output::Null => Ok(()),
            Output::Stdout { .. } => {
                let mut stdout = io::stdout().lock();
                // Flush each batch: a guest prompt has no newline to flush it.
                stdout
                    .write_all(bytes)
                    .and_then(|()| stdout.flush())
                    .map_err(|source| Error::WriteStdout { source })
            }
            Output::File { path, file } => {
                file.write_all(bytes).map_err(|source| Error::WriteFile {
                    path: path.clone(),
                    source,
                })
            }
            Output::Socket(server) => {
                server.queue(bytes);
                Ok(())
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent (byte queues and
    // option swaps), so a panic elsewhere does not make them unusable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn spawn(name: &'static str, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .map_err(|source| Error::SpawnThread { name, source })
}

/// Sends one input chunk, waiting while a bounded channel is full. Returns
/// false once `stopped` says the backend is gone.
fn forward_chunk(input: &Sender<Vec<u8>>, mut chunk: Vec<u8>, stopped: impl Fn() -> bool) -> bool {
    loop {
        match input.send_timeout(chunk, INPUT_STOP_POLL) {
            Ok(()) => return true,
            Err(SendTimeoutError::Timeout(back)) => {
                if stopped() {
                    return false;
                }
                chunk = back;
            }
            // Nobody wants input any more; output may still be wanted, so
            // the caller keeps going and the bytes are discarded.
            Err(SendTimeoutError::Disconnected(_)) => return true,
        }
    }
}

/// The stdin side of [`Sink::Stdio`].
#[derive(Debug)]
struct StdinReader {
    /// Set when the backend is dropped; the reader thread checks it after
    /// every read and exits. The thread is detached (see module docs).
    stop: Arc<AtomicBool>,
}

impl StdinReader {
    fn spawn(input: Sender<Vec<u8>>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        spawn("uart-stdin", move || {
            let stopped = || thread_stop.load(Ordering::Acquire);
            let mut stdin = io::stdin();
            let mut buf = [0u8; READ_CHUNK];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "UART stdin read failed; input stops");
                        return;
                    }
                };
                if stopped() || !forward_chunk(&input, buf[..n].to_vec(), stopped) {
                    return;
                }
            }
        })?;
        Ok(Self { stop })
    }
}

impl Drop for StdinReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// State shared by a [`SocketServer`], its acceptor thread and its writer
/// thread.
#[derive(Default)]
struct SocketShared {
    state: Mutex<SocketState>,
    /// Signalled when output is queued, a client attaches, or `closing` is set;
    /// only the writer thread waits on it.
    writer_wakeup: Condvar,
}

impl SocketShared {
    fn lock(&self) -> MutexGuard<'_, SocketState> {
        lock(&self.state)
    }
}

#[derive(Default)]
struct SocketState {
    /// Output not yet handed to a client, oldest first, at most
    /// `SOCKET_BUFFER_LIMIT` bytes.
    pending: VecDeque<u8>,
    /// Bytes dropped from the front of `pending` to respect the bound.
    dropped: u64,
    /// The connected client. Set by the acceptor when it accepts; cleared by
    /// the acceptor at EOF, by the writer on a write error, or by drop. Whoever
    /// clears it also shuts the stream down, so no thread stays blocked on a
    /// client that is no longer here.
    client: Option<Arc<UnixStream>>,
    /// Set once, by `SocketServer::drop`; both threads exit when they see it.
    closing: bool,
}

impl SocketState {
    fn queue(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
        self.trim();
    }

    /// Puts bytes a client did not take back at the front, ahead of anything
    /// queued meanwhile, so the next client sees the stream in order.
    fn requeue_front(&mut self, bytes: &[u8]) {
        for &byte in bytes.iter().rev() {
            self.pending.push_front(byte);
        }
        self.trim();
    }

    fn trim(&mut self) {
        let excess = self.pending.len().saturating_sub(SOCKET_BUFFER_LIMIT);
        if excess > 0 {
            self.pending.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    fn detach_client(&mut self, stream: &Arc<UnixStream>) {
        if self.client.as_ref().is_some_and(|c| Arc::ptr_eq(c, stream)) {
            self.client = None;
        }
        // Errors only mean the peer is already gone.
        let _ = stream.shutdown(Shutdown::Both);
    }
}

/// The server side of [`Sink::UnixSocket`].
struct SocketServer {
    path: PathBuf,
    /// Device and inode of the socket file we bound, so drop only unlinks
    /// (and connects to) our own file, not a replacement someone put there.
    file_id: (u64, u64),
    shared: Arc<SocketShared>,
    /// Accepts clients and forwards their input; holds the listener and an
    /// input sender, both dropped when it exits.
    acceptor: Option<JoinHandle<()>>,
    /// Moves `pending` to the client.
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SocketServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SocketServer {
    fn open(path: &Path, input: Sender<Vec<u8>>) -> Result<Self> {
        claim_socket_path(path)?;
        let listener = UnixListener::bind(path).map_err(|source| Error::BindSocket {
            path: path.to_owned(),
            source,
        })?;
        let meta = fs::symlink_metadata(path).map_err(|source| Error::InspectSocketPath {
            path: path.to_owned(),
            source,
        })?;
        // From here on, dropping `server` on an error path stops whatever
        // thread did start and unlinks the socket.
        let mut server = Self {
            path: path.to_owned(),
            file_id: (meta.dev(), meta.ino()),
            shared: Arc::default(),
            acceptor: None,
            writer: None,
        };
        let shared = Arc::clone(&server.shared);
        server.writer = Some(spawn("uart-socket-out", move || run_writer(&shared))?);
        let shared = Arc::clone(&server.shared);
        server.acceptor = Some(spawn("uart-socket-in", move || {
            run_acceptor(&listener, &shared, &input)
        })?);
        Ok(server)
    }

    fn queue(&self, bytes: &[u8]) {
        self.shared.lock().queue(bytes);
        self.shared.writer_wakeup.notify_one();
    }

    fn is_our_socket_file(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok_and(|meta| {
            meta.file_type().is_socket() && (meta.dev(), meta.ino()) == self.file_id
        })
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.closing = true;
            if let Some(client) = state.client.take() {
                let _ = client.shutdown(Shutdown::Both);
            }
        }
        self.shared.writer_wakeup.notify_all();
        if let Some(writer) = self.writer.take() {
            // Cannot hang: the writer either waits on the condvar (woken
            // above) or writes to a client that has been shut down.
            let _ = writer.join();
        }

        let ours = self.is_our_socket_file();
        if let Some(acceptor) = self.acceptor.take() {
            // The acceptor may sit in accept(); one connection wakes it and it
            // then sees `closing`. A finished acceptor has closed the
            // listener, so the connect fails and the join returns at once.
            let woken = ours && UnixStream::connect(&self.path).is_ok();
            if woken || acceptor.is_finished() {
                let _ = acceptor.join();
            } else {
                tracing::warn!(
                    path = %self.path.display(),
                    "UART socket file replaced; acceptor thread left blocked"
                );
            }
        }
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Makes `path` free for binding: absent, or a stale socket that we remove.
fn claim_socket_path(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::InspectSocketPath {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(Error::ClaimSocketPath {
            path: path.to_owned(),
        });
    }
    // A socket somebody still accepts on is not stale: taking it over would
    // steal that process's clients.
    if UnixStream::connect(path).is_ok() {
        return Err(Error::ReplaceLiveSocket {
            path: path.to_owned(),
        });
    }
    fs::remove_file(path).map_err(|source| Error::RemoveStaleSocket {
        path: path.to_owned(),
        source,
    })
}

fn run_acceptor(listener: &UnixListener, shared: &SocketShared, input: &Sender<Vec<u8>>) {
    loop {
        if shared.lock().closing {
            return;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => Arc::new(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "UART socket accept failed; no further clients");
                return;
            }
        };
        {
            // Checked under the lock that drop sets `closing` under, so a
            // client accepted during shutdown is never installed (drop would
            // not shut it down, and the read below would never return).
            let mut state = shared.lock();
            if state.closing {
                return;
            }
            state.client = Some(Arc::clone(&stream));
        }
        shared.writer_wakeup.notify_one();

        let mut buf = [0u8; READ_CHUNK];
        loop {
            let n = match (&*stream).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if !forward_chunk(input, buf[..n].to_vec(), || shared.lock().closing) {
                return;
            }
        }
        // A half-closed client counts as gone: shutting it fully also frees
        // the writer if it is blocked on it.
        shared.lock().detach_client(&stream);
    }
}

fn run_writer(shared: &SocketShared) {
    let mut state = shared.lock();
    loop {
        if state.closing {
            return;
        }
        let client = match &state.client {
            Some(client) if !state.pending.is_empty() => Arc::clone(client),
            _ => {
                state = shared
                    .writer_wakeup
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
        };
        let chunk: Vec<u8> = state.pending.drain(..).collect();
        // Write without the lock so the device can keep queueing meanwhile.
        drop(state);
        let sent = write_until_error(&client, &chunk);
        state = shared.lock();
        if sent < chunk.len() {
            state.requeue_front(&chunk[sent..]);
            state.detach_client(&client);
        }
    }
}

/// Writes as much of `bytes` as the client takes; returns how much that was.
fn write_until_error(mut stream: &UnixStream, bytes: &[u8]) -> usize {
    let mut sent = 0;
    while sent < bytes.len() {
        match stream.write(&bytes[sent..]) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    sent
}

#[cfg(any(test, feature = "test-utils"))]
pub mod mock {
    //! An in-memory character backend for tests of UART wrappers.
    //!
    //! [`MemorySink`] records output in a shared buffer, sends injected input
    //! on the same kind of channel a real backend uses, and can be told to
    //! fail writes. Clones share all state, so a test keeps one clone to
    //! inspect and control while the device under test owns another.

    use std::io;
    use std::sync::{Arc, Mutex};

    use crossbeam_channel::Sender;

    use super::{lock, CharBackendT, Error, Result};

    /// A [`CharBackendT`] that captures output in memory.
    ///
    /// ```
    /// # #[cfg(feature = "test-utils")] {
    /// use switchboard_devices::models::uart_sink::{mock::MemorySink, CharBackendT};
    ///
    /// let (input, input_rx) = crossbeam_channel::unbounded();
    /// let sink = MemorySink::new(input);
    /// let mut device_side = sink.clone();
    /// device_side.write(b"ok").expect("memory write");
    /// assert_eq!(sink.output_bytes(), b"ok");
    /// assert!(sink.inject_input(b"x"));
    /// assert_eq!(input_rx.recv().expect("input"), b"x");
    /// # }
    /// ```
    #[derive(Debug, Clone)]
    pub struct MemorySink {
        output: Arc<Mutex<Vec<u8>>>,
        input: Sender<Vec<u8>>,
        /// When set, every write fails with this kind and records nothing.
        write_fault: Arc<Mutex<Option<io::ErrorKind>>>,
    }

    impl MemorySink {
        /// Creates a sink whose injected input is sent on `input`.
        pub fn new(input: Sender<Vec<u8>>) -> Self {
            Self {
                output: Arc::default(),
                input,
                write_fault: Arc::default(),
            }
        }

        /// The shared buffer holding every byte written so far.
        pub fn output(&self) -> Arc<Mutex<Vec<u8>>> {
            Arc::clone(&self.output)
        }

        /// A copy of every byte written so far.
        pub fn output_bytes(&self) -> Vec<u8> {
            lock(&self.output).clone()
        }

        /// Sends `bytes` as one input chunk, as a backend's input thread
        /// would. Returns false if the receiver is gone.
        pub fn inject_input(&self, bytes: &[u8]) -> bool {
            self.input.send(bytes.to_vec()).is_ok()
        }

        /// Makes later writes fail with `kind`, or succeed again with `None`.
        pub fn set_write_fault(&self, kind: Option<io::ErrorKind>) {
            *lock(&self.write_fault) = kind;
        }
    }

    impl CharBackendT for MemorySink {
        fn write(&mut self, bytes: &[u8]) -> Result<()> {
            if let Some(kind) = *lock(&self.write_fault) {
                return Err(Error::WriteMemory {
                    source: io::Error::from(kind),
                });
            }
            lock(&self.output).extend_from_slice(bytes);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mock::MemorySink;
    use super::*;

    use crossbeam_channel::{Receiver, RecvTimeoutError};

    /// Upper bound for anything a test waits on; reached only on failure.
    const TIMEOUT: Duration = Duration::from_secs(10);

    fn connect(path: &Path) -> UnixStream {
        let client = UnixStream::connect(path).expect("connect to UART socket");
        client
            .set_read_timeout(Some(TIMEOUT))
            .expect("set read timeout");
        client
    }

    fn read_exactly(client: &mut UnixStream, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        client.read_exact(&mut buf).expect("read UART output");
        buf
    }

    fn receive_input(rx: &Receiver<Vec<u8>>, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < len {
            got.extend(rx.recv_timeout(TIMEOUT).expect("input chunk"));
        }
        got
    }

    fn open_socket(path: &Path) -> (CharBackend, Receiver<Vec<u8>>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let backend =
            CharBackend::open(&Sink::UnixSocket(path.to_owned()), tx).expect("open socket sink");
        (backend, rx)
    }

    #[test]
    fn test_null_sink_discards_output() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut backend = CharBackend::open(&Sink::Null, tx).expect("open null sink");
        backend.write(b"gone").expect("null write");
        assert_eq!(backend.dropped_output(), 0);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn test_file_sink_appends_and_creates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        fs::write(&path, b"old\n").expect("seed file");
        let (tx, _rx) = crossbeam_channel::unbounded();
        let mut backend = CharBackend::open(&Sink::File(path.clone()), tx).expect("open file");
        backend.write(b"new ").expect("write");
        backend.write(b"bytes").expect("write");
        assert_eq!(fs::read(&path).expect("read back"), b"old\nnew bytes");

        let fresh = dir.path().join("fresh.log");
        let (tx, _rx) = crossbeam_channel::unbounded();
        let mut backend = CharBackend::open(&Sink::File(fresh.clone()), tx).expect("create file");
        backend.write(b"x").expect("write");
        assert_eq!(fs::read(&fresh).expect("read back"), b"x");
    }

    #[test]
    fn test_file_sink_open_error_names_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing-dir").join("console.log");
        let (tx, _rx) = crossbeam_channel::unbounded();
        let err = CharBackend::open(&Sink::File(path.clone()), tx).expect_err("no parent dir");
        assert!(matches!(err, Error::OpenFile { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn test_socket_client_gets_buffered_then_live_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uart.sock");
        let (mut backend, _rx) = open_socket(&path);
        backend.write(b"before ").expect("write");
        let mut client = connect(&path);
        backend.write(b"after").expect("write");
        assert_eq!(read_exactly(&mut client, 12), b"before after");
        assert_eq!(backend.dropped_output(), 0);
    }

    #[test]
    fn test_socket_client_input_arrives_on_channel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uart.sock");
        let (_backend, rx) = open_socket(&path);
        let mut client = connect(&path);
        client.write_all(b"hello").expect("client write");
        assert_eq!(receive_input(&rx, 5), b"hello");
    }

    #[test]
    fn test_socket_refuses_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("not-a-socket");
        fs::write(&path, b"precious").expect("seed file");
        let (tx, _rx) = crossbeam_channel::unbounded();
        let err = CharBackend::open(&Sink::UnixSocket(path.clone()), tx).expect_err("regular file");
        assert!(matches!(err, Error::ClaimSocketPath { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(fs::read(&path).expect("file still there"), b"precious");
    }

    #[test]
    fn test_socket_replaces_stale_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uart.sock");
        drop(UnixListener::bind(&path).expect("bind stale"));
        assert!(path.exists());
        let (mut backend, _rx) = open_socket(&path);
        let mut client = connect(&path);
        backend.write(b"up").expect("write");
        assert_eq!(read_exactly(&mut client, 2), b"up");
    }

    #[test]
    fn test_socket_refuses_live_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uart.sock");
        let _other = UnixListener::bind(&path).expect("bind other server");
        let (tx, _rx) = crossbeam_channel::unbounded();
        let err = CharBackend::open(&Sink::UnixSocket(path.clone()), tx).expect_err("live socket");
        assert!(matches!(err, Error::ReplaceLiveSocket { .. }));
        assert!(path.exists());
    }

    #[test]
    fn test_socket_buffer_drops_oldest_beyond_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uart.sock");
        let (mut backend, _rx) = open_socket(&path);
        let data: Vec<u8> = (0..SOCKET_BUFFER_LIMIT + 10).map(|i| i as u8).collect();
        backend.write(&data[..100]).expect("write");
        backend.write(&data[100..]).expect("write");
        assert_eq!(backend.dropped_output(), 10);
        let mut client = connect(&path);
        assert_eq!(read_exactly(&mut client, SOCKET_BUFFER_LIMIT), data[10..]);
    }

    #[test]
    fn test_socket_serves_next_client_after_disconnect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uart.sock");
        let (mut backend, rx) = open_socket(&path);
        let mut first = connect(&path);
        backend.write(b"one").expect("write");
        assert_eq!(read_exactly(&mut first, 3), b"one");
        drop(first);

        let mut second = connect(&path);
        backend.write(b"two").expect("write");
        assert_eq!(read_exactly(&mut second, 3), b"two");
        second.write_all(b"in").expect("client write");
        assert_eq!(receive_input(&rx, 2), b"in");
    }

    #[test]
    fn test_socket_drop_stops_threads_and_removes_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uart.sock");
        let (mut backend, rx) = open_socket(&path);
        let mut client = connect(&path);
        backend.write(b"bye").expect("write");
        assert_eq!(read_exactly(&mut client, 3), b"bye");
        drop(backend);
        // The acceptor's input sender is gone only once it has exited.
        assert_eq!(
            rx.recv_timeout(TIMEOUT),
            Err(RecvTimeoutError::Disconnected)
        );
        assert!(!path.exists());
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("read EOF");
        assert!(rest.is_empty());
    }

    #[test]
    fn test_socket_drop_without_client_stops_acceptor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uart.sock");
        let (backend, rx) = open_socket(&path);
        drop(backend);
        assert_eq!(
            rx.recv_timeout(TIMEOUT),
            Err(RecvTimeoutError::Disconnected)
        );
        assert!(!path.exists());
    }

    #[test]
    fn test_input_channel_stays_open_while_backend_lives() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let backend = CharBackend::open(&Sink::Stdout, tx).expect("open stdout sink");
        assert_eq!(rx.try_recv(), Err(crossbeam_channel::TryRecvError::Empty));
        drop(backend);
        assert_eq!(
            rx.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        );
    }

    #[test]
    fn test_memory_sink_captures_output_and_injects_input() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let sink = MemorySink::new(tx);
        let mut device_side: Box<dyn CharBackendT> = Box::new(sink.clone());
        device_side.write(b"abc").expect("write");
        device_side.write(b"def").expect("write");
        assert_eq!(*lock(&sink.output()), b"abcdef");
        assert!(sink.inject_input(b"typed"));
        assert_eq!(rx.recv_timeout(TIMEOUT).expect("input"), b"typed");
    }

    #[test]
    fn test_memory_sink_injected_write_fault() {
        let (tx, _rx) = crossbeam_channel::unbounded();
        let sink = MemorySink::new(tx);
        let mut device_side = sink.clone();
        sink.set_write_fault(Some(io::ErrorKind::BrokenPipe));
        let err = device_side.write(b"lost").expect_err("injected fault");
        assert!(matches!(err, Error::WriteMemory { .. }));
        sink.set_write_fault(None);
        device_side.write(b"kept").expect("write");
        assert_eq!(sink.output_bytes(), b"kept");
    }
}
