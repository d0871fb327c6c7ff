// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Waiting for vhost-user frontends so that a stop always ends the wait,
//! ending a connection's queue workers, and the socket file a server owns.
//!
//! [`crate::vhost_user`] serves one frontend at a time and waits here in
//! between:
//!
//! - **Waiting.** The listening socket is non-blocking and watched with
//!   epoll together with the [`StopSignal`]'s eventfd ([`FrontendWait`]).
//!   A connection is accepted only once the listener is readable, and a
//!   stop ends the wait however the socket file was treated (removed,
//!   replaced) and for an inherited listener (`--socket-fd`) alike. The
//!   old way, connecting to the socket path to end a blocked `accept`,
//!   hung for ever once the file was gone.
//! - **Ending the workers.** Each connection has its own queue workers
//!   (the vhost-user-backend crate's epoll loops). They are told to exit
//!   through a [`WorkerExit`] of ours, not through the crate's
//!   `exit_event`: the crate registers the consumer half of that event
//!   with `into_raw_fd` and never closes it, which leaked one eventfd per
//!   worker per connection.
//! - **The socket file.** [`SocketFile`] remembers the device and inode of
//!   the socket it bound, and removes the path on drop only while it still
//!   names that socket: a file put in its place is left alone.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Errors of waiting for frontends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the stop eventfd failed.
    #[error("Create the stop eventfd")]
    CreateStopEvent(#[source] io::Error),
    /// Writing the stop eventfd failed.
    #[error("Write the stop eventfd")]
    RaiseStop(#[source] io::Error),
    /// Creating the epoll instance failed.
    #[error("Create an epoll instance")]
    CreateEpoll(#[source] io::Error),
    /// Adding a file descriptor to the epoll set failed.
    #[error("Watch {what}")]
    Watch {
        /// What was to be watched.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Waiting on the epoll set failed.
    #[error("Wait for a frontend or a stop")]
    Wait(#[source] io::Error),
    /// The listening socket was shut down: no frontend can connect again.
    #[error("The listening socket was shut down")]
    ListenerShutDown,
    /// Creating a connection's worker exit eventfd failed.
    #[error("Create the worker exit eventfd")]
    CreateExitEvent(#[source] io::Error),
    /// Registering the exit eventfd with a queue worker failed.
    #[error("Register the exit eventfd with worker {worker}")]
    RegisterExit {
        /// The worker.
        worker: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Result of waiting for frontends.
pub type Result<T> = std::result::Result<T, Error>;

/// A stop request, seen by every wait it concerns: a flag, and an eventfd
/// that is written on stop and never read, so that it stays readable.
#[derive(Debug, Default)]
pub(crate) struct StopSignal {
    /// Set by [`StopSignal::raise`], never cleared.
    raised: AtomicBool,
    /// The eventfd [`FrontendWait`] watches. Made by the first wait (a
    /// stop handle is made with `Default`, which cannot fail), and written
    /// by `raise` or, if the stop came first, by [`StopSignal::event`].
    event: Mutex<Option<Arc<EventFd>>>,
    /// Notified by `raise`, under `event`'s lock: what
    /// [`StopSignal::wait_timeout`] sleeps on.
    raised_cond: Condvar,
}

impl StopSignal {
    /// Raises the stop: every wait, present or future, returns
    /// [`Woken::Stop`].
    pub(crate) fn raise(&self) {
        // Stored before the lock is taken: an `event` that takes the lock
        // after this sees the flag, one that took it before left its
        // eventfd in the slot for this to write.
        self.raised.store(true, Ordering::Release);
        let event = self.event.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = event.as_ref() {
            if let Err(e) = e.write(1) {
                tracing::error!(error = %e, "write the stop eventfd");
            }
        }
        self.raised_cond.notify_all();
    }

    /// Waits until the stop is raised or `timeout` passes; returns whether
    /// it was raised.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> bool {
        let event = self.event.lock().unwrap_or_else(|e| e.into_inner());
        // The flag is read under the lock `raise` takes after setting it:
        // a raise is either seen here or notifies the wait below.
        let _event = self
            .raised_cond
            .wait_timeout_while(event, timeout, |_| !self.raised())
            .unwrap_or_else(|e| e.into_inner());
        self.raised()
    }

    /// Whether the stop was raised.
    pub(crate) fn raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// The eventfd that is readable once the stop is raised.
    pub(crate) fn event(&self) -> Result<Arc<EventFd>> {
        let mut slot = self.event.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = slot.as_ref() {
            return Ok(Arc::clone(e));
        }
        let event =
            Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::CreateStopEvent)?);
        if self.raised() {
            // Raised while there was no eventfd to write.
            event.write(1).map_err(Error::RaiseStop)?;
        }
        *slot = Some(Arc::clone(&event));
        Ok(event)
    }
}

/// What ended a [`FrontendWait::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// A frontend is waiting to be accepted.
    Frontend,
    /// The stop was raised.
    Stop,
}

/// Epoll tokens of [`FrontendWait`].
const LISTENER: u64 = 0;
const STOP: u64 = 1;

/// A listening socket and a stop eventfd, watched together.
#[derive(Debug)]
pub(crate) struct FrontendWait {
    epoll: Epoll,
    /// Kept open while it is in the epoll set.
    _stop: Arc<EventFd>,
}

impl FrontendWait {
    /// Watches `listener` for connections and `stop` for a stop. The
    /// listener should be non-blocking, so that an `accept` after a
    /// wake-up never blocks.
    pub(crate) fn new(listener: &impl AsRawFd, stop: Arc<EventFd>) -> Result<Self> {
        let epoll = Epoll::new().map_err(Error::CreateEpoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                // READ_HANG_UP: a listener shut down for reading stays
                // readable and accepts nothing; it must not look like a
                // frontend for ever.
                EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, LISTENER),
            )
            .map_err(|source| Error::Watch {
                what: "the listening socket",
                source,
            })?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )
            .map_err(|source| Error::Watch {
                what: "the stop eventfd",
                source,
            })?;
        Ok(FrontendWait { epoll, _stop: stop })
    }

    /// Blocks until a frontend waits to be accepted or the stop is raised;
    /// a stop wins if both are ready.
    pub(crate) fn wait(&self) -> Result<Woken> {
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Wait(e)),
            };
            let ready = &events[..n.min(events.len())];
            if ready.iter().any(|e| e.data() == STOP) {
                return Ok(Woken::Stop);
            }
            if let Some(e) = ready.iter().find(|e| e.data() == LISTENER) {
                let hung_up = EventSet::READ_HANG_UP | EventSet::HANG_UP;
                if e.event_set().intersects(hung_up) {
                    return Err(Error::ListenerShutDown);
                }
                return Ok(Woken::Frontend);
            }
        }
    }
}

/// A socket file this process bound. Dropping it removes the path if the
/// path still names that socket (same device and inode), and leaves
/// whatever else is there alone.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Listens on `path`. A socket already at `path` is removed first: the
    /// caller has checked that nobody listens on it (a stale socket).
    pub(crate) fn bind(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok((
            listener,
            SocketFile {
                path: path.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
        ))
    }

    /// The path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the path if it is still this socket. Idempotent.
    pub(crate) fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "remove the socket file");
                }
            }
            Ok(_) => tracing::warn!(
                path = %self.path.display(),
                "the socket path no longer names this server's socket; left as it is"
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "inspect the socket file");
            }
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Tells one connection's queue workers to leave their epoll loops: an
/// eventfd registered with every worker and written once the connection
/// is over. It must outlive the workers: closing it would take it, and a
/// pending wake-up with it, out of their epoll sets.
#[derive(Debug)]
pub(crate) struct WorkerExit {
    event: EventFd,
}

impl WorkerExit {
    /// A new, unwritten exit event.
    pub(crate) fn new() -> Result<Self> {
        Ok(WorkerExit {
            event: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::CreateExitEvent)?,
        })
    }

    /// Makes the event readable: every worker watching it exits. Never
    /// read back, so writing it again is harmless.
    pub(crate) fn fire(&self) {
        if let Err(e) = self.event.write(1) {
            tracing::error!(error = %e, "write the worker exit eventfd");
        }
    }

    /// A guard that fires the event when dropped: declared after the
    /// daemon, it is dropped first, so that the daemon's drop (which joins
    /// the workers) never waits for workers nobody told to exit.
    pub(crate) fn fire_on_drop(&self) -> FireOnDrop<'_> {
        FireOnDrop(self)
    }
}

impl AsRawFd for WorkerExit {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.event.as_raw_fd()
    }
}

/// Fires a [`WorkerExit`] when dropped.
#[derive(Debug)]
pub(crate) struct FireOnDrop<'a>(&'a WorkerExit);

impl Drop for FireOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fire();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;

    /// A non-blocking listener on a socket in `dir`, and its path.
    fn listening(dir: &Path) -> (UnixListener, PathBuf) {
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        (listener, path)
    }

    #[test]
    fn test_wait_returns_stop_once_raised_even_if_raised_before_the_event_existed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listener, _path) = listening(dir.path());
        let stop = StopSignal::default();
        stop.raise();
        let wait = FrontendWait::new(&listener, stop.event().expect("event")).expect("wait");
        assert_eq!(wait.wait().expect("wait"), Woken::Stop);
        // A latch: it stays raised.
        assert_eq!(wait.wait().expect("wait"), Woken::Stop);
    }

    #[test]
    fn test_wait_is_ended_by_a_stop_from_another_thread_without_the_socket_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listener, path) = listening(dir.path());
        std::fs::remove_file(&path).expect("remove the socket file");
        let stop = Arc::new(StopSignal::default());
        let wait = FrontendWait::new(&listener, stop.event().expect("event")).expect("wait");
        let raiser = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                stop.raise();
            })
        };
        assert_eq!(wait.wait().expect("wait"), Woken::Stop);
        raiser.join().expect("raiser");
    }

    #[test]
    fn test_wait_reports_a_frontend_and_accept_then_does_not_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listener, path) = listening(dir.path());
        let stop = StopSignal::default();
        let wait = FrontendWait::new(&listener, stop.event().expect("event")).expect("wait");
        let _client = UnixStream::connect(&path).expect("connect");
        assert_eq!(wait.wait().expect("wait"), Woken::Frontend);
        let (stream, _) = listener.accept().expect("accept");
        // Accepted streams do not inherit O_NONBLOCK: the daemon's reads block.
        let flags = rustix::fs::fcntl_getfl(&stream).expect("flags");
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK));
        stop.raise();
        assert_eq!(wait.wait().expect("wait"), Woken::Stop);
    }

    #[test]
    fn test_wait_fails_on_a_listener_shut_down_for_reading() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listener, _path) = listening(dir.path());
        let stop = StopSignal::default();
        let wait = FrontendWait::new(&listener, stop.event().expect("event")).expect("wait");
        rustix::net::shutdown(&listener, rustix::net::Shutdown::Read).expect("shutdown");
        assert!(matches!(wait.wait(), Err(Error::ListenerShutDown)));
    }

    #[test]
    fn test_socket_file_removes_its_own_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listener, file) = SocketFile::bind(&dir.path().join("s.sock")).expect("bind");
        let path = file.path().to_path_buf();
        drop(listener);
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn test_socket_file_leaves_a_replacing_file_or_socket_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_listener, file) = SocketFile::bind(&dir.path().join("s.sock")).expect("bind");
        let path = file.path().to_path_buf();
        std::fs::remove_file(&path).expect("remove");
        std::fs::write(&path, b"precious").expect("write");
        drop(file);
        assert_eq!(std::fs::read(&path).expect("still there"), b"precious");

        std::fs::remove_file(&path).expect("remove");
        let (_first, file) = SocketFile::bind(&path).expect("bind");
        std::fs::remove_file(&path).expect("remove");
        let _other = UnixListener::bind(&path).expect("another socket");
        drop(file);
        assert!(path.exists(), "another server's socket was removed");
    }

    #[test]
    fn test_socket_file_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists(), "a closed listener leaves its file");
        let (_listener, _file) = SocketFile::bind(&path).expect("rebind");
        UnixStream::connect(&path).expect("connect to the new socket");
    }

    #[test]
    fn test_worker_exit_guard_fires_on_drop() {
        let exit = WorkerExit::new().expect("exit");
        drop(exit.fire_on_drop());
        assert_eq!(exit.event.read().expect("fired"), 1);
    }
}
