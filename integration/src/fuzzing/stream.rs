// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The vhost-user message stream, as a frontend sends it, into the real
//! server: a virtio-rng (even first byte) or a virtio-blk (odd) served
//! in this process by [`serve_in_process`], each on its own socket.
//!
//! The input after the first byte is written, as it is, into a fresh
//! connection (no file descriptors: SET_MEM_TABLE and the eventfd messages
//! are refused for want of them, everything else is decoded and handled),
//! and the write half is shut. The server must then end the connection
//! (it has read everything there is) and join the connection's queue
//! workers within [`WAIT`], and take the next frontend: the next input's
//! connection, or the corpus test's.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use switchboard_devices::models::blk::{Blk, BlkOptions};
use switchboard_devices::models::rng::Rng;

use super::wait_for_threads_named;
use crate::{serve_in_process, Served};

/// How long the server may take to end a connection whose frontend has
/// said everything, or to take a new one.
pub const WAIT: Duration = Duration::from_secs(10);
/// Most input bytes sent: well within a socket's buffer, so the write
/// never waits for the server.
pub const STREAM_MAX: usize = 64 << 10;

/// The served devices, for the life of the process.
struct Servers {
    rng: Served<Rng>,
    blk: Served<Blk>,
    /// The socket directory and the disk's image; removed at exit (never,
    /// in practice: statics are not dropped).
    _dir: tempfile::TempDir,
}

fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a socket directory");
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0x5au8; 64 * 512]).expect("write the image");
        let options = BlkOptions {
            io_threads: 1,
            ..BlkOptions::default()
        };
        let blk = Blk::open(&image, &options).expect("open the image");
        let rng = Rng::new(None).expect("an entropy device");
        Servers {
            rng: serve_in_process(rng, 1, dir.path().join("rng.sock")),
            blk: serve_in_process(blk, 1, dir.path().join("blk.sock")),
            _dir: dir,
        }
    })
}

/// The name vhost-user-backend gives a connection's queue worker threads.
/// Between connections the server has none: it makes a connection's
/// daemon, and the workers with it, only once a frontend is waiting.
const QUEUE_WORKER: &str = "vring_worker";

/// Sends `bytes` on a fresh connection to `socket`, shuts the write half,
/// reads until the server closes the connection, then waits until the
/// server has joined the connection's queue workers; panics if either
/// takes longer than [`WAIT`].
fn session(socket: &Path, bytes: &[u8]) {
    let mut stream = UnixStream::connect(socket).expect("the server listens");
    stream
        .set_write_timeout(Some(WAIT))
        .expect("set a write timeout");
    stream
        .set_read_timeout(Some(WAIT))
        .expect("set a read timeout");
    match stream.write_all(bytes) {
        Ok(()) => {}
        // The server closed the connection before reading it all: it
        // refused a message, and the rest is not read.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) => {}
        Err(e) => panic!("send the stream: {e}"),
    }
    // Nothing more comes: the server reads the end of the stream next.
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            // A signal (libFuzzer's timers) is not the server's answer.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("the server did not end the connection within {WAIT:?}: {e}"),
        }
    }
    // The crate closes the socket as its request loop ends, before the
    // server drains the queues and joins their workers (LeakSanitizer took
    // a worker ending during the next input for a leak of its epoll event
    // buffer and its thread's closure).
    wait_for_threads_named(QUEUE_WORKER, WAIT);
}

/// A vhost-user message stream into the real server (see the module
/// docs for the input).
pub fn fuzz_vhost_user_stream(data: &[u8]) {
    let Some((&which, stream)) = data.split_first() else {
        return;
    };
    let servers = servers();
    let socket = if which % 2 == 0 {
        &servers.rng.socket
    } else {
        &servers.blk.socket
    };
    session(socket, &stream[..stream.len().min(STREAM_MAX)]);
}
