// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Listening and stopping: the loop that waits for a frontend (polling the
//! non-blocking listener together with the stop's eventfd), serves one
//! connection at a time through the vhost-user-backend daemon, and on stop
//! drains the device within [`STOP_DEADLINE`](super::STOP_DEADLINE). The
//! socket file is removed only if it is still the socket that was bound.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use switchboard_runtime::{GateDrainError, Lanes, State};

use super::{pending_of, Error, Result, VhostUserServer, DRAIN_DEADLINE_PASSED, STOP_DEADLINE};
use crate::models::virtio::VirtioDevice;
use crate::vhost_user::filter::{self, Filter};
use crate::vhost_user::listen::{self, FrontendWait, SocketFile, StopSignal, Woken, WorkerExit};

/// Stops [`serve`] from another thread (a signal handler's thread, say).
///
/// A stop always completes: the serving loop waits for a frontend by
/// polling the listener together with the stop's eventfd (see `listen`),
/// so a wait ends however the socket file was treated, and a connected
/// frontend is shut down whether or not it still answers.
#[derive(Clone, Default)]
pub struct StopHandle {
    /// Raised by `stop`, never lowered. The serving loop watches its
    /// eventfd with the listener, and checks it once it has handed a
    /// frontend to a daemon.
    signal: Arc<StopSignal>,
    /// The current connection's shutdown handle: set by the serving loop
    /// once a frontend is accepted, and taken back when the connection is
    /// over (it holds a duplicate of the connection's socket). `stop`
    /// shuts the connection down, which ends the daemon thread's read or
    /// write; the loop then drains the queues and ends the workers.
    shutdown: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle")
            .field("stopped", &self.stopped())
            .finish()
    }
}

impl StopHandle {
    /// Asks the server to stop: the current connection is shut down (which
    /// drains the queues) and no new frontend is accepted.
    pub fn stop(&self) {
        // Raised before the handle is read: a serving loop that stores a
        // handle after this read sees the stop when it checks afterwards.
        self.signal.raise();
        if let Some(h) = self
            .shutdown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
    }

    /// Whether [`StopHandle::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.signal.raised()
    }

    /// Waits until [`StopHandle::stop`] is called or `timeout` passes;
    /// returns whether it was called (a restart's backoff ends early).
    pub fn wait_stopped(&self, timeout: std::time::Duration) -> bool {
        self.signal.wait_timeout(timeout)
    }
}

/// The default number of queue workers for `queues` queues: one per
/// queue, at most one per CPU.
pub fn default_workers(queues: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    queues.clamp(1, cpus)
}

/// Refuses a socket path that exists and is not a socket, or is a socket
/// some process still listens on. A stale socket is fine (it is replaced).
pub fn check_socket_path(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::SocketInUse {
                    path: path.display().to_string(),
                });
            }
            Ok(())
        }
        Ok(_) => Err(Error::NotASocket {
            path: path.display().to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::InspectSocket {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Serves `server` on the unix socket at `path`, one frontend at a time,
/// accepting a new frontend after each disconnect, until `stop` is used.
/// After every disconnect the queues are drained and the device reset before
/// the next frontend is accepted. The socket file is removed at the end if
/// it is still this server's socket (a file put in its place stays).
pub fn serve<D: VirtioDevice>(
    server: VhostUserServer<D>,
    path: &Path,
    stop: &StopHandle,
) -> Result<()> {
    serve_bound(server, bind(path)?, stop)
}

/// A socket bound and listening, not yet served: binding first lets a
/// caller report a bad socket path before it starts a serving thread.
pub struct BoundSocket {
    /// Made from a plain `UnixListener`, so that the crate's listener does
    /// not remove the path on drop whatever it names by then.
    listener: Listener,
    /// Removes the socket file on drop, if the path still names it; `None`
    /// for an inherited socket, whose file is its owner's. Held only for
    /// its drop.
    _file: Option<SocketFile>,
    /// What logs call it: the path, or `socket fd N`.
    name: String,
}

impl std::fmt::Debug for BoundSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundSocket")
            .field("name", &self.name)
            .finish()
    }
}

impl BoundSocket {
    /// A socket that is already listening (`--socket-fd`: inherited from a
    /// service manager), named `name` in logs. Its file is not removed
    /// when it is dropped: its owner made it.
    pub fn inherited(listener: UnixListener, name: impl Into<String>) -> Self {
        BoundSocket {
            // Made with `From`, the crate's listener knows no path to remove.
            listener: Listener::from(listener),
            _file: None,
            name: name.into(),
        }
    }

    /// What logs call it: the socket's path, or the name it was inherited
    /// under.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Checks `path` ([`check_socket_path`]) and listens on it. When the
/// returned socket is dropped, the socket file is removed if the path
/// still names this socket (same device and inode); a file that replaced
/// it is left alone.
pub fn bind(path: &Path) -> Result<BoundSocket> {
    check_socket_path(path)?;
    let (listener, file) = SocketFile::bind(path).map_err(|e| Error::Listen {
        path: path.display().to_string(),
        source: vhost::vhost_user::Error::SocketError(e),
    })?;
    Ok(BoundSocket {
        listener: Listener::from(listener),
        _file: Some(file),
        name: path.display().to_string(),
    })
}

/// [`serve`] on a socket [`bind`] made, or one [`BoundSocket::inherited`].
pub fn serve_bound<D: VirtioDevice>(
    server: VhostUserServer<D>,
    mut socket: BoundSocket,
    stop: &StopHandle,
) -> Result<()> {
    // Dropping `socket` afterwards removes the socket file if it is ours.
    serve_on(server, &mut socket, stop)
}

/// As [`serve_bound`], leaving the socket listening afterwards: a device
/// restarted after a failure is served on it again, and a frontend that
/// reconnects in between waits in its backlog.
pub fn serve_on<D: VirtioDevice>(
    server: VhostUserServer<D>,
    socket: &mut BoundSocket,
    stop: &StopHandle,
) -> Result<()> {
    serve_listener(server, &mut socket.listener, &socket.name, stop)
}

/// Like [`serve`], on a socket that is already listening (`--socket-fd`),
/// named `name` in logs. The socket is not removed afterwards: its owner
/// made it.
pub fn serve_unix_listener<D: VirtioDevice>(
    server: VhostUserServer<D>,
    listener: UnixListener,
    name: &str,
    stop: &StopHandle,
) -> Result<()> {
    serve_bound(server, BoundSocket::inherited(listener, name), stop)
}

/// Like [`serve`], on a listener the caller already has; nothing is
/// removed afterwards. The listener is made non-blocking and accepted from
/// only once it is readable, so `stop` ends the wait for a frontend in
/// every case. Nothing else may accept on it (in this process or another
/// holding the same socket): a frontend taken between the wake-up and the
/// accept would leave the crate's accept loop spinning until the next one.
pub fn serve_listener<D: VirtioDevice>(
    server: VhostUserServer<D>,
    listener: &mut Listener,
    name: &str,
    stop: &StopHandle,
) -> Result<()> {
    let waiting = |e: listen::Error| Error::Serve {
        path: name.to_string(),
        reason: crate::error_chain(&e),
    };
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::Listen {
            path: name.to_string(),
            source,
        })?;
    let event = stop.signal.event().map_err(waiting)?;
    let wait = FrontendWait::new(&*listener, event).map_err(waiting)?;
    server.start();
    // Until stopped, or until the device fails (its gate is then Stopped).
    let served = loop {
        if server.gate().state() != State::Running {
            break Ok(());
        }
        match wait.wait().map_err(waiting) {
            Ok(Woken::Stop) => break Ok(()),
            Ok(Woken::Frontend) => {
                if let Err(e) = serve_connection(&server, listener, name, stop) {
                    break Err(e);
                }
            }
            Err(e) => break Err(e),
        }
    };
    served.and(finish_serving(&server, name))
}

/// The end of serving: nothing more is admitted, and the requests still in
/// flight (a frontend gone silent with requests queued) get the deadline.
fn finish_serving<D: VirtioDevice>(server: &VhostUserServer<D>, name: &str) -> Result<()> {
    let drained = server.gate().drain(Some(STOP_DEADLINE));
    match drained {
        Ok(_) => Ok(()),
        Err(GateDrainError::Failed { reason, .. }) => {
            // Failed earlier: already reported (log, supervisor, its gate);
            // stopping it now is not a second failure. Its requests still
            // in flight are being answered by their drop guards: a stopped
            // device has none left, so wait for them as a drain does.
            if let Err(report) = server.gate().wait_idle(Lanes::All, Some(STOP_DEADLINE)) {
                tracing::error!(socket = name, error = %report, pending = ?pending_of(&report), "a failed device stopped with requests still in flight");
            }
            tracing::info!(socket = name, %reason, "stopped a device that had failed");
            Ok(())
        }
        Err(report) => {
            tracing::error!(socket = name, error = %report, pending = ?pending_of(&report), "stopped with requests still in flight");
            server
                .gate()
                .fail(format!("{DRAIN_DEADLINE_PASSED}{report}"));
            Ok(())
        }
    }
}

/// The epoll token of a connection's [`WorkerExit`] in its queue workers:
/// after the queues' tokens, the crate's own (`queues`) and the completion
/// event's (`queues + 1`).
pub(super) fn exit_token(queues: usize) -> usize {
    queues + 2
}

/// Serves the frontend waiting on `listener` until it disconnects or `stop`
/// is used, then drains the queues, ends the connection's workers and
/// resets the device.
fn serve_connection<D: VirtioDevice>(
    server: &VhostUserServer<D>,
    listener: &mut Listener,
    name: &str,
    stop: &StopHandle,
) -> Result<()> {
    let kind = server.device().kind();
    let queues = server.num_queues();
    let serving = |e: listen::Error| Error::Serve {
        path: name.to_string(),
        reason: crate::error_chain(&e),
    };
    // Declared before the daemon, so it is closed only after the daemon's
    // drop has joined the workers that watch it.
    let exit = WorkerExit::new().map_err(serving)?;
    // A daemon per connection: the crate keeps per-connection state
    // (ownership, vring setup) in it, and a reconnecting frontend starts
    // from scratch. Device state lives in `server` and survives.
    let mut daemon = VhostUserDaemon::new(
        kind.to_string(),
        server.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| Error::CreateDaemon {
        kind,
        reason: e.to_string(),
    })?;
    let handlers = daemon.get_epoll_handlers();
    for (worker, handler) in handlers.iter().enumerate() {
        let token = exit_token(queues) as u64;
        if let Err(source) = handler.register_listener(exit.as_raw_fd(), EventSet::IN, token) {
            // This worker can never be told to exit, and the daemon's drop
            // would wait for it for ever: give the daemon up (the workers
            // registered so far exit).
            exit.fire();
            std::mem::forget(daemon);
            return Err(serving(listen::Error::RegisterExit { worker, source }));
        }
    }
    // From here on, every return tells the workers to exit before the
    // daemon's drop joins them.
    let _exit_on_return = exit.fire_on_drop();
    for (worker, handler) in handlers.iter().enumerate() {
        let fd = server.shared.completions[worker].event.as_raw_fd();
        handler
            .register_listener(fd, EventSet::IN, queues as u64 + 1)
            .map_err(|source| Error::RegisterCompletion { worker, source })?;
    }
    // The listener is readable and nothing else accepts on it: the accept
    // returns the waiting frontend at once (or nothing, if it went away).
    let accepted = listener.accept().map_err(|e| Error::Serve {
        path: name.to_string(),
        reason: format!("accept: {e}"),
    })?;
    let Some(frontend) = accepted else {
        return Ok(());
    };
    // The crate serves the private end; the message filter sits between
    // it and the frontend (see `filter.rs`).
    let (mut private, filter_end) = private_socket().map_err(|e| Error::Serve {
        path: name.to_string(),
        reason: format!("create the private socket for the message filter: {e}"),
    })?;
    daemon.start(&mut private).map_err(|e| Error::Serve {
        path: name.to_string(),
        reason: e.to_string(),
    })?;
    let filter = Filter {
        slot: Arc::clone(&server.shared.inflight),
        queues,
        name: name.to_string(),
    };
    let interposed = filter::interpose(frontend, filter_end, filter).map_err(|e| Error::Serve {
        path: name.to_string(),
        reason: format!("start the message filter: {e}"),
    })?;
    *stop.shutdown.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
    // The gate's failure hook disconnects the frontend through this one.
    *server
        .shared
        .connection
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
    if stop.stopped() || server.gate().state() != State::Running {
        // Stopped, or failed, between the accept and here.
        daemon.request_shutdown();
    }
    let result = daemon.wait();
    // The crate's end is closed now: the filter closes the frontend's.
    interposed.join();
    // Their duplicates of the connection's socket are closed now, not when
    // the next frontend connects.
    stop.shutdown
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    server
        .shared
        .connection
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if stop.stopped() {
        // Stopping: refuse new work from here, which also bounds the wait
        // below by STOP_DEADLINE (a request that never completes cannot
        // hold the stop for ever).
        server.gate().begin_drain();
    }
    // The workers finish what is in flight (writing used entries) before
    // they are told to exit.
    server.drain_all("disconnect");
    exit.fire();
    server.shared.device.reset();
    match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => tracing::info!(socket = name, "frontend disconnected"),
        Err(e) => tracing::warn!(socket = name, error = %e, "frontend connection ended"),
    }
    // Joins the workers (told to exit above) and drops the crate's handler
    // with its memory: then the connection's guest memory can be unmapped.
    drop(daemon);
    server.forget_memory();
    server.shared.inflight.clear();
    Ok(())
}

/// A listener only this user can reach, with a connection to it queued:
/// the crate accepts it, the message filter holds the other end. The
/// listener's file (in a fresh 0700 directory under the temporary
/// directory) is removed before this returns.
fn private_socket() -> io::Result<(Listener, UnixStream)> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "switchboard-filter-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    // `create` (not `create_all`) fails on an existing path: nobody else's
    // directory or link is used.
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("s");
    let made = UnixListener::bind(&path).and_then(|l| Ok((l, UnixStream::connect(&path)?)));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    let (listener, stream) = made?;
    Ok((Listener::from(listener), stream))
}
