// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The message filter between a frontend and the vhost-user-backend
//! crate's request handler.
//!
//! The crate answers GET_INFLIGHT_FD with "not supported", and its handler
//! is private: nothing beneath it can take those messages. So each
//! connection is served through a filter: the frontend's socket is read
//! here, one framed message at a time (header, body, file descriptors),
//! and every message is passed on unchanged to the crate over a private
//! socket, except two that the filter answers itself once the frontend
//! has acknowledged `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`:
//!
//! - GET_INFLIGHT_FD: creates the in-flight file (`inflight::create`) and
//!   replies with it; on a request it cannot meet it replies with a size
//!   of 0, which a frontend takes as "no in-flight tracking".
//! - SET_INFLIGHT_FD: maps the file (`Inflight::map`, which checks it)
//!   and makes it the connection's; a refused file is logged with the
//!   reason and NACKed when the frontend asked for a reply.
//!
//! It also watches two messages it passes on: SET_PROTOCOL_FEATURES (to
//! know what was acknowledged) and SET_VRING_KICK, after which it kicks
//! the queue once while a file is mapped, so that the worker recovers the
//! queue and resubmits what was in flight even if the guest, waiting for
//! those very requests, never kicks again.
//!
//! The crate's replies come back the same way, one framed message at a
//! time, so a reply the filter writes never lands inside one of the
//! crate's. Control messages only pass here: the rings and buffers are
//! shared memory, so requests never do.
//!
//! A message the filter cannot frame (a body larger than the protocol's
//! 4 KiB, more than 32 file descriptors, a stream cut inside a message)
//! ends the connection, as it would end the crate's.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures, MAX_MSG_SIZE};

use super::inflight::{self, Inflight};

/// The most file descriptors one message may carry (the protocol's).
const MAX_FDS: usize = 32;
/// Header: request, flags, size (u32 each, little-endian).
const HEADER: usize = 12;
/// Header flags: protocol version 1, a reply, a reply wanted.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// The size of `VhostUserInflight` (two u64, two u16, padded).
const INFLIGHT_BODY: usize = 24;
/// SET_VRING_KICK's "no file descriptor" bit.
const VRING_NOFD: u64 = 0x100;

/// One framed message.
struct Message {
    header: [u8; HEADER],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes(self.header[0..4].try_into().expect("4 bytes"))
    }
    fn flags(&self) -> u32 {
        u32::from_le_bytes(self.header[4..8].try_into().expect("4 bytes"))
    }
    fn u64_at(&self, at: usize) -> Option<u64> {
        Some(u64::from_le_bytes(
            self.body.get(at..at + 8)?.try_into().ok()?,
        ))
    }
    fn u16_at(&self, at: usize) -> Option<u16> {
        Some(u16::from_le_bytes(
            self.body.get(at..at + 2)?.try_into().ok()?,
        ))
    }
    fn reply(request: u32, body: Vec<u8>, fds: Vec<OwnedFd>) -> Self {
        let mut header = [0u8; HEADER];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&(VERSION_1 | REPLY).to_le_bytes());
        header[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Message { header, body, fds }
    }
}

/// Reads exactly `buf.len()` bytes, collecting any file descriptors.
/// `Ok(false)`: the stream ended before the first byte.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut buf[got..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if received.flags.contains(ReturnFlags::CTRUNC) || fds.len() > MAX_FDS {
            return Err(io::Error::other(format!(
                "more than {MAX_FDS} file descriptors in one message"
            )));
        }
        if received.bytes == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ended inside a message",
            ));
        }
        got += received.bytes;
    }
    Ok(true)
}

/// Reads one message; `None` at the end of the stream.
fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER];
    let mut fds = Vec::new();
    if !recv_exact(sock, &mut header, &mut fds)? {
        return Ok(None);
    }
    let size = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    if size > MAX_MSG_SIZE {
        return Err(io::Error::other(format!(
            "a message body of {size} bytes (at most {MAX_MSG_SIZE})"
        )));
    }
    let mut body = vec![0u8; size];
    if size > 0 && !recv_exact(sock, &mut body, &mut fds)? {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the stream ended inside a message",
        ));
    }
    Ok(Some(Message { header, body, fds }))
}

/// Writes one message, its file descriptors with its first byte.
fn write_message(sock: &UnixStream, message: &Message) -> io::Result<()> {
    let mut sent = 0;
    let total = HEADER + message.body.len();
    while sent < total {
        let (head, body) = if sent < HEADER {
            (&message.header[sent..], &message.body[..])
        } else {
            (&[][..], &message.body[sent - HEADER..])
        };
        let iov = [IoSlice::new(head), IoSlice::new(body)];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds: Vec<_> = message.fds.iter().map(AsFd::as_fd).collect();
        if sent == 0 && !fds.is_empty() {
            control.push(SendAncillaryMessage::ScmRights(&fds));
        }
        match rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What the filter needs of the server.
pub(crate) struct Filter {
    /// Where a mapped in-flight file goes.
    pub(crate) slot: Arc<inflight::Slot>,
    /// The device's queue count: the most queues an in-flight file may
    /// have.
    pub(crate) queues: usize,
    /// The socket's name, for the log.
    pub(crate) name: String,
}

/// A connection's two filter threads.
pub(crate) struct Interposed {
    threads: Vec<JoinHandle<()>>,
    /// The filter's end of the private socket.
    backend: UnixStream,
    /// The frontend's socket, shut if the threads do not end by themselves
    /// (a frontend that reads no reply leaves a write blocked).
    frontend: UnixStream,
}

/// How long the filter may take to pass on what the crate wrote last once
/// the crate is done, before the frontend's socket is shut under it.
const FLUSH_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

impl Interposed {
    /// Ends the filter once the crate is done with the connection, and
    /// waits for both threads. The crate keeps duplicates of its end
    /// (shutdown handles), so its end of the stream may never be seen to
    /// close: the filter's end is shut for reading instead, after which
    /// what the crate wrote last is still read and passed on, then the
    /// stream ends, the frontend's socket is shut and both threads end.
    ///
    /// A frontend that reads no reply can keep the filter's write to it
    /// blocked for ever: if the threads have not ended after
    /// [`FLUSH_GRACE`], the frontend's socket is shut, which ends the write.
    pub(crate) fn join(self) {
        let _ = self.backend.shutdown(std::net::Shutdown::Read);
        let start = std::time::Instant::now();
        while !self.threads.iter().all(JoinHandle::is_finished) {
            if start.elapsed() >= FLUSH_GRACE {
                tracing::debug!("the frontend is not taking replies: its socket is shut");
                let _ = self.frontend.shutdown(std::net::Shutdown::Both);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Starts filtering between `frontend` and `backend` (the crate's end of
/// the private socket).
pub(crate) fn interpose(
    frontend: UnixStream,
    backend: UnixStream,
    filter: Filter,
) -> io::Result<Interposed> {
    frontend.set_nonblocking(false)?;
    backend.set_nonblocking(false)?;
    let own_end = backend.try_clone()?;
    let frontend_end = frontend.try_clone()?;
    let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
    let (up_front, up_back) = (frontend.try_clone()?, backend.try_clone()?);
    let replies = Arc::clone(&to_frontend);
    let up = std::thread::Builder::new()
        .name("vhost-user-filter".into())
        .spawn(move || {
            if let Err(e) = upstream(&up_front, &up_back, &replies, &filter) {
                tracing::warn!(socket = filter.name, error = %e, "frontend message refused; connection ended");
            }
            let _ = up_back.shutdown(std::net::Shutdown::Both);
            let _ = up_front.shutdown(std::net::Shutdown::Read);
        })?;
    let down = std::thread::Builder::new()
        .name("vhost-user-filter".into())
        .spawn(move || {
            let result = (|| -> io::Result<()> {
                while let Some(message) = read_message(&backend)? {
                    write_message(
                        &to_frontend.lock().unwrap_or_else(|e| e.into_inner()),
                        &message,
                    )?;
                }
                Ok(())
            })();
            if let Err(e) = result {
                tracing::debug!(error = %e, "backend to frontend stream ended");
            }
            let _ = frontend.shutdown(std::net::Shutdown::Both);
            let _ = backend.shutdown(std::net::Shutdown::Both);
        })?;
    Ok(Interposed {
        threads: vec![up, down],
        backend: own_end,
        frontend: frontend_end,
    })
}

/// Frontend to backend: every message passed on, but the two in-flight
/// messages once negotiated.
fn upstream(
    frontend: &UnixStream,
    backend: &UnixStream,
    replies: &Mutex<UnixStream>,
    filter: &Filter,
) -> io::Result<()> {
    let inflight_acked = AtomicBool::new(false);
    let reply = |m: Message| write_message(&replies.lock().unwrap_or_else(|e| e.into_inner()), &m);
    while let Some(message) = read_message(frontend)? {
        let request = message.request();
        let acked = inflight_acked.load(Ordering::Relaxed);
        if request == FrontendReq::GET_INFLIGHT_FD as u32 && acked {
            reply(get_inflight(&message, filter))?;
            continue;
        }
        if request == FrontendReq::SET_INFLIGHT_FD as u32 && acked {
            let need_reply = message.flags() & NEED_REPLY != 0;
            let ok = set_inflight(message, filter);
            if need_reply {
                let status: u64 = if ok { 0 } else { 1 };
                reply(Message::reply(
                    request,
                    status.to_le_bytes().to_vec(),
                    Vec::new(),
                ))?;
            }
            continue;
        }
        if request == FrontendReq::SET_PROTOCOL_FEATURES as u32 {
            if let Some(f) = message.u64_at(0) {
                let bit = VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
                inflight_acked.store(f & bit != 0, Ordering::Relaxed);
            }
        }
        // The queue's kick, kept to kick it once after the crate has it.
        let kick = (request == FrontendReq::SET_VRING_KICK as u32
            && message.fds.len() == 1
            && message.u64_at(0).is_some_and(|v| v & VRING_NOFD == 0)
            && filter.slot.get().is_some())
        .then(|| message.fds[0].try_clone().ok())
        .flatten();
        write_message(backend, &message)?;
        if let Some(kick) = kick {
            let _ = rustix::io::write(&kick, &1u64.to_ne_bytes());
        }
    }
    Ok(())
}

/// GET_INFLIGHT_FD: a new file for the queues asked, or a size of 0.
fn get_inflight(message: &Message, filter: &Filter) -> Message {
    let request = message.request();
    let asked = message.u16_at(16).zip(message.u16_at(18));
    let created = asked
        .ok_or_else(|| "a body shorter than 20 bytes".to_string())
        .and_then(|(queues, size)| {
            inflight::create(queues, size, filter.queues)
                .map(|(file, len)| (file, len, queues, size))
                .map_err(|e| crate::error_chain(&e))
        });
    let mut body = vec![0u8; INFLIGHT_BODY];
    match created {
        Ok((file, len, queues, size)) => {
            body[0..8].copy_from_slice(&len.to_le_bytes());
            body[16..18].copy_from_slice(&queues.to_le_bytes());
            body[18..20].copy_from_slice(&size.to_le_bytes());
            tracing::info!(
                socket = filter.name,
                queues,
                queue_size = size,
                bytes = len,
                "in-flight tracking file created"
            );
            Message::reply(request, body, vec![OwnedFd::from(file)])
        }
        Err(reason) => {
            tracing::warn!(socket = filter.name, %reason, "GET_INFLIGHT_FD refused: answered with no file");
            Message::reply(request, body, Vec::new())
        }
    }
}

/// SET_INFLIGHT_FD: maps the file; whether it was accepted.
fn set_inflight(mut message: Message, filter: &Filter) -> bool {
    let fd = message.fds.pop().filter(|_| message.fds.is_empty());
    let fields = (|| {
        Some((
            message.u64_at(0)?,
            message.u64_at(8)?,
            message.u16_at(16)?,
            message.u16_at(18)?,
        ))
    })();
    let mapped = match (fd, fields) {
        (Some(fd), Some((size, offset, queues, queue_size))) => Inflight::map(
            &File::from(fd),
            size,
            offset,
            queues,
            queue_size,
            filter.queues,
        )
        .map_err(|e| crate::error_chain(&e)),
        (None, _) => Err("not exactly one file descriptor".to_string()),
        (_, None) => Err("a body shorter than 20 bytes".to_string()),
    };
    match mapped {
        Ok(inflight) => {
            tracing::info!(
                socket = filter.name,
                ?inflight,
                "in-flight tracking file mapped"
            );
            filter.slot.set(inflight);
            true
        }
        Err(reason) => {
            tracing::error!(socket = filter.name, %reason, "SET_INFLIGHT_FD refused");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn test_messages_are_framed_across_partial_writes() {
        let (a, b) = UnixStream::pair().expect("filter test");
        let bytes = message(1, VERSION_1, &[7; 10]);
        use std::io::Write;
        (&a).write_all(&bytes[..5]).expect("filter test");
        let reader = std::thread::spawn(move || {
            read_message(&b).expect("filter test").expect("filter test")
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        (&a).write_all(&bytes[5..]).expect("filter test");
        let m = reader.join().expect("filter test");
        assert_eq!(m.request(), 1);
        assert_eq!(m.body, vec![7; 10]);
    }

    #[test]
    fn test_an_oversized_body_is_refused_not_read() {
        let (a, b) = UnixStream::pair().expect("filter test");
        let mut bytes = message(1, VERSION_1, &[]);
        bytes[8..12].copy_from_slice(&(MAX_MSG_SIZE as u32 + 1).to_le_bytes());
        use std::io::Write;
        (&a).write_all(&bytes).expect("filter test");
        let e = read_message(&b).err().expect("refused");
        assert!(e.to_string().contains("4096"), "{e}");
    }

    #[test]
    fn test_a_stream_cut_inside_a_message_is_an_error_and_a_clean_end_is_not() {
        let (a, b) = UnixStream::pair().expect("filter test");
        drop(a);
        assert!(read_message(&b).expect("filter test").is_none());
        let (a, b) = UnixStream::pair().expect("filter test");
        use std::io::Write;
        (&a).write_all(&message(1, VERSION_1, &[1; 8])[..15])
            .expect("filter test");
        drop(a);
        assert!(read_message(&b).is_err());
    }

    #[test]
    fn test_file_descriptors_travel_with_their_message() {
        let (a, b) = UnixStream::pair().expect("filter test");
        let (file, _) = inflight::create(1, 8, 1).expect("filter test");
        let m = Message::reply(31, vec![1, 2, 3], vec![OwnedFd::from(file)]);
        write_message(&a, &m).expect("filter test");
        let got = read_message(&b).expect("filter test").expect("filter test");
        assert_eq!(got.fds.len(), 1);
        assert_eq!(got.body, vec![1, 2, 3]);
        assert_eq!(got.flags(), VERSION_1 | REPLY);
    }

    #[test]
    fn test_get_inflight_answers_a_sealed_file_sized_for_the_queues() {
        let filter = Filter {
            slot: Arc::default(),
            queues: 2,
            name: "t".into(),
        };
        let mut body = vec![0u8; INFLIGHT_BODY];
        body[16..18].copy_from_slice(&2u16.to_le_bytes());
        body[18..20].copy_from_slice(&128u16.to_le_bytes());
        let m = Message {
            header: [0; HEADER],
            body,
            fds: Vec::new(),
        };
        let r = get_inflight(&m, &filter);
        assert_eq!(r.body.len(), INFLIGHT_BODY);
        let size = r.u64_at(0).expect("filter test");
        assert_eq!(size, 2 * inflight::queue_region_size(128) as u64);
        let file = File::from(r.fds.into_iter().next().expect("filter test"));
        assert!(super::super::memory::sealed(&file));
        // It maps back, as the next connection's SET_INFLIGHT_FD would.
        assert!(Inflight::map(&file, size, 0, 2, 128, 2).is_ok());
        // Three queues of a two-queue device: no file, size 0.
        let mut body = vec![0u8; INFLIGHT_BODY];
        body[16..18].copy_from_slice(&3u16.to_le_bytes());
        body[18..20].copy_from_slice(&128u16.to_le_bytes());
        let m = Message {
            header: [0; HEADER],
            body,
            fds: Vec::new(),
        };
        let r = get_inflight(&m, &filter);
        assert_eq!(r.u64_at(0), Some(0));
        assert!(r.fds.is_empty());
    }
}
