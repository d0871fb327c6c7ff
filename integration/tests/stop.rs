// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Stopping the real `switchboard` binary always completes, and serving
//! frontends leaks no descriptor.
//!
//! `serve blk`, `serve rng` and `run` are each sent SIGTERM (or SIGINT, or
//! a device-del) in every state a server waits in: no frontend, a frontend
//! connected and idle, requests in flight, the socket file deleted, the
//! socket file replaced by a regular file. Each must exit 0 within
//! [`STOP_WITHIN`]; a regular file put in place of a socket must survive.
//! Then 2,000 frontend connections (bare connects and full handshakes)
//! must leave `serve blk`'s descriptor count where it was.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use switchboard_integration::frontend::{self, TestFrontend, VIRTQ_DESC_F_WRITE};
use switchboard_integration::switchboard_bin;

/// How long a stop may take, from the signal to the exit.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// A switchboard process with its stderr in a file.
struct Proc {
    child: Child,
    stderr: PathBuf,
}

impl Proc {
    fn start(dir: &Path, args: &[&str]) -> Proc {
        let stderr = dir.join(format!("stderr-{}.txt", args.join("-").replace('/', "_")));
        let child = Command::new(switchboard_bin())
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start switchboard");
        Proc { child, stderr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.stderr) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Polls for the exit until `within` has passed; kills the process and
    /// fails if it has not exited by then.
    fn exits_within(&mut self, within: Duration, what: &str) -> ExitStatus {
        match exit_within(&mut self.child, within) {
            Some(status) => status,
            None => panic!(
                "{what}: still running {within:?} after the stop; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Sends `sig` and asserts an exit with status 0 within [`STOP_WITHIN`].
    fn stop_with(&mut self, sig: &str, what: &str) {
        self.signal(sig);
        let status = self.exits_within(STOP_WITHIN, what);
        assert!(
            status.success(),
            "{what}: exit status {status:?}; stderr:\n{}",
            self.stderr()
        );
    }

    /// The number of open descriptors.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/PID/fd")
            .count()
    }

    /// The number of threads.
    fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .expect("read /proc/PID/task")
            .count()
    }

    fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "{what}: exited early ({status:?}); stderr:\n{}",
                self.stderr()
            );
        }
    }
}

/// Polls `child` for its exit until `within` has passed; kills it and
/// returns `None` if it is still running then.
fn exit_within(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

fn wait_for_sockets(proc: &mut Proc, sockets: &[&Path]) {
    for s in sockets {
        let start = Instant::now();
        while !is_socket(s) {
            proc.assert_running("start");
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no socket {} after 20 s; stderr:\n{}",
                s.display(),
                proc.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A sparse image of `size` bytes.
fn image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("disk.img");
    File::create(&p)
        .and_then(|f| f.set_len(size))
        .expect("image");
    p
}

/// The states a server is stopped in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    NoFrontend,
    IdleFrontend,
    /// A frontend that sends requests and never reads the replies: the
    /// server blocks writing to it.
    DeafFrontend,
    InFlight,
    SocketDeleted,
    SocketReplaced,
}

/// What a replaced socket file holds.
const PRECIOUS: &[u8] = b"a regular file, not switchboard's";

/// Takes the socket file away as `state` says; returns what must hold
/// after the exit.
fn tamper(state: State, socket: &Path) {
    match state {
        State::SocketDeleted => std::fs::remove_file(socket).expect("delete the socket file"),
        State::SocketReplaced => {
            std::fs::remove_file(socket).expect("delete the socket file");
            std::fs::write(socket, PRECIOUS).expect("write a regular file");
        }
        _ => {}
    }
}

fn check_after(state: State, socket: &Path, what: &str) {
    match state {
        State::SocketReplaced => assert_eq!(
            std::fs::read(socket).expect("the regular file is still there"),
            PRECIOUS,
            "{what}: the file that replaced the socket was changed"
        ),
        _ => assert!(!socket.exists(), "{what}: socket file left behind"),
    }
}

/// blk: reads of 1 MiB into one shared buffer, each with its own status
/// byte, enough of them that they are still being served when SIGTERM
/// arrives.
const BLK_READ: u32 = 1 << 20;
const BLK_HDR: u64 = 0x10_0000;
const BLK_STATUS: u64 = 0x10_8000;
const BLK_DATA: u64 = 0x20_0000;

/// Makes `n` blk reads available on queue 0 and kicks once.
fn push_blk_reads(fe: &mut TestFrontend, n: u16, image_sectors: u64) {
    use vm_memory::{Bytes, GuestAddress};
    let per_read = u64::from(BLK_READ) / 512;
    for i in 0..n {
        let sector = (u64::from(i) * per_read) % (image_sectors - per_read);
        let hdr = BLK_HDR + 16 * u64::from(i);
        fe.mem
            .write_slice(
                &frontend::blk_header(frontend::VIRTIO_BLK_T_IN, sector),
                GuestAddress(hdr),
            )
            .expect("header");
        let status = BLK_STATUS + u64::from(i);
        fe.mem
            .write_obj(0xffu8, GuestAddress(status))
            .expect("status");
        fe.add_chain(
            0,
            &[
                (hdr, 16, 0),
                (BLK_DATA, BLK_READ, VIRTQ_DESC_F_WRITE),
                (status, 1, VIRTQ_DESC_F_WRITE),
            ],
        )
        .expect("chain");
    }
    fe.kick(0).expect("kick");
}

fn blk_statuses(fe: &TestFrontend, n: u16) -> Vec<u8> {
    use vm_memory::{Bytes, GuestAddress};
    (0..n)
        .map(|i| {
            fe.mem
                .read_obj(GuestAddress(BLK_STATUS + u64::from(i)))
                .expect("status")
        })
        .collect()
}

/// rng: requests of [`RNG_RATE`] bytes against a limit of as many bytes a
/// second: the first is answered at once, each further one a second later.
const RNG_RATE: u32 = 8192;
const RNG_REQUESTS: u16 = 3;

fn push_rng_reads(fe: &mut TestFrontend) {
    for i in 0..RNG_REQUESTS {
        let buf = 0x10_0000 + u64::from(i) * 0x1_0000;
        fe.add_chain(0, &[(buf, RNG_RATE, VIRTQ_DESC_F_WRITE)])
            .expect("chain");
    }
    fe.kick(0).expect("kick");
}

/// What a test frontend left in flight on one device.
enum Load {
    Blk { fe: TestFrontend, n: u16 },
    Rng { fe: TestFrontend },
}

impl Load {
    /// Starts requests on a blk device and returns once the first is
    /// answered: the backend is working through the others.
    fn blk(socket: &Path, queue_size: u16, n: u16, image_sectors: u64) -> Load {
        let mut fe = frontend::connect(socket, 1, queue_size).expect("frontend");
        push_blk_reads(&mut fe, n, image_sectors);
        let start = Instant::now();
        while fe.used_idx(0).expect("used idx") == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no blk read answered in 10 s"
            );
            thread::yield_now();
        }
        Load::Blk { fe, n }
    }

    /// Starts rate-limited rng requests; returns once the first is answered
    /// (the others are held by the limiter, in flight).
    fn rng(socket: &Path) -> Load {
        let mut fe = frontend::connect(socket, 1, 256).expect("frontend");
        push_rng_reads(&mut fe);
        fe.wait_used(0, 1, Duration::from_secs(5))
            .expect("the first rng request is answered at once");
        Load::Rng { fe }
    }

    /// Answered requests as the used ring shows them.
    fn used(&self) -> u16 {
        match self {
            Load::Blk { fe, .. } | Load::Rng { fe } => fe.used_idx(0).expect("used idx"),
        }
    }

    fn total(&self) -> u16 {
        match self {
            Load::Blk { n, .. } => *n,
            Load::Rng { .. } => RNG_REQUESTS,
        }
    }

    /// Asserts that requests were in flight when the stop was sent (`used`
    /// then) and all were answered by the exit.
    fn check(&self, used_at_stop: u16, what: &str) {
        assert!(
            used_at_stop < self.total(),
            "{what}: nothing was in flight at the stop ({used_at_stop} of {} done)",
            self.total()
        );
        assert_eq!(
            self.used(),
            self.total(),
            "{what}: requests in flight at the stop were not all answered"
        );
        if let Load::Blk { fe, n } = self {
            let statuses = blk_statuses(fe, *n);
            let failed: Vec<(usize, u8)> = statuses
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, s)| *s != 0)
                .collect();
            assert!(
                failed.is_empty(),
                "{what}: blk reads that did not end with VIRTIO_BLK_S_OK (index, status): {failed:?}"
            );
        }
    }
}

/// Connects to `socket` and sends GET_FEATURES requests without reading a
/// reply until the socket takes no more: by then the server is blocked
/// writing replies nobody reads.
fn deaf_frontend(socket: &Path) -> UnixStream {
    use std::io::Write as _;
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_nonblocking(true).expect("non-blocking");
    // GET_FEATURES (1), version 1 flags, no payload.
    let request: Vec<u8> = [1u32, 1, 0].iter().flat_map(|w| w.to_le_bytes()).collect();
    let batch = request.repeat(1024);
    let start = Instant::now();
    let mut blocked_since: Option<Instant> = None;
    loop {
        match s.write(&batch) {
            Ok(_) => blocked_since = None,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Full for a while: the server has stopped reading too.
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(200) {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("write to the server: {e}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the server kept reading requests for 20 s"
        );
    }
    s
}

/// Runs `state` against a server on `socket` (already listening in
/// `proc`), stops it with `sig` and checks the outcome. `load` starts
/// requests for [`State::InFlight`].
fn stop_in_state(
    proc: &mut Proc,
    sockets: &[&Path],
    state: State,
    sig: &str,
    what: &str,
    load: impl FnOnce() -> Load,
) {
    let mut idle = None;
    let mut deaf = None;
    let mut in_flight = None;
    match state {
        State::IdleFrontend => {
            idle = Some(frontend::connect(sockets[0], 1, 256).expect("frontend handshake"));
        }
        State::DeafFrontend => deaf = Some(deaf_frontend(sockets[0])),
        State::InFlight => in_flight = Some(load()),
        State::SocketDeleted | State::SocketReplaced => {
            for s in sockets {
                tamper(state, s);
            }
        }
        State::NoFrontend => {}
    }
    proc.assert_running(what);
    let used_at_stop = in_flight.as_ref().map(Load::used);
    proc.stop_with(sig, what);
    if let (Some(load), Some(used)) = (&in_flight, used_at_stop) {
        load.check(used, what);
    }
    drop(idle);
    drop(deaf);
    for s in sockets {
        check_after(state, s, what);
    }
}

fn serve_blk(state: State) {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 64 << 20;
    let img = image(dir.path(), size);
    let socket = dir.path().join("blk.sock");
    let mut proc = Proc::start(
        dir.path(),
        &[
            "serve",
            "blk",
            "--queue-size",
            "1024",
            "--path",
            img.to_str().expect("utf-8 path"),
            "--socket-path",
            socket.to_str().expect("utf-8 path"),
        ],
    );
    wait_for_sockets(&mut proc, &[&socket]);
    let what = format!("serve blk, {state:?}");
    stop_in_state(&mut proc, &[&socket], state, "TERM", &what, || {
        // 340 chains of 3 descriptors fill a 1024-entry table.
        Load::blk(&socket, 1024, 340, size / 512)
    });
}

fn serve_rng(state: State) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("rng.sock");
    let rate = RNG_RATE.to_string();
    let mut proc = Proc::start(
        dir.path(),
        &[
            "serve",
            "rng",
            "--rate-limit",
            &rate,
            "--socket-path",
            socket.to_str().expect("utf-8 path"),
        ],
    );
    wait_for_sockets(&mut proc, &[&socket]);
    let what = format!("serve rng, {state:?}");
    stop_in_state(&mut proc, &[&socket], state, "TERM", &what, || {
        Load::rng(&socket)
    });
}

/// A topology of one blk and one rate-limited rng device in `dir`.
fn topology(dir: &Path) -> PathBuf {
    let file = dir.join("topology.json");
    std::fs::write(
        &file,
        format!(
            r#"{{
  "devices": [
    {{ "id": "disk0", "kind": "virtio-blk", "path": "disk.img",
      "vhost_user": {{ "socket": "disk0.sock" }} }},
    {{ "id": "rng0", "kind": "virtio-rng", "rate_limit": {RNG_RATE},
      "vhost_user": {{ "socket": "rng0.sock" }} }}
  ]
}}
"#
        ),
    )
    .expect("write the topology");
    file
}

/// Starts `switchboard run` of [`topology`] in `dir` with a control
/// socket; returns it and its disk, rng and control socket paths.
fn start_run(dir: &Path) -> (Proc, PathBuf, PathBuf, PathBuf) {
    let file = topology(dir);
    let (disk, rng, control) = (
        dir.join("disk0.sock"),
        dir.join("rng0.sock"),
        dir.join("control.sock"),
    );
    let proc = Proc::start(
        dir,
        &[
            "run",
            file.to_str().expect("utf-8 path"),
            "--create-images",
            "64M",
            "--control",
            control.to_str().expect("utf-8 path"),
        ],
    );
    (proc, disk, rng, control)
}

fn run(state: State) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, disk, rng, control) = start_run(dir.path());
    wait_for_sockets(&mut proc, &[&rng, &disk, &control]);
    let what = format!("run, {state:?}");
    // The rng socket first: the idle and in-flight frontends go to it (its
    // requests stay in flight for seconds); tampering touches all three.
    stop_in_state(
        &mut proc,
        &[&rng, &disk, &control],
        state,
        "TERM",
        &what,
        || Load::rng(&rng),
    );
}

/// One test per server and state.
macro_rules! stop_tests {
    ($($name:ident: $server:ident($state:ident),)*) => {
        $(
            #[test]
            fn $name() {
                $server(State::$state);
            }
        )*
    };
}

stop_tests! {
    test_serve_blk_stops_within_5s_with_no_frontend: serve_blk(NoFrontend),
    test_serve_blk_stops_within_5s_with_an_idle_frontend: serve_blk(IdleFrontend),
    test_serve_blk_stops_within_5s_with_a_frontend_that_reads_no_reply: serve_blk(DeafFrontend),
    test_serve_blk_stops_within_5s_with_requests_in_flight: serve_blk(InFlight),
    test_serve_blk_stops_within_5s_with_its_socket_file_deleted: serve_blk(SocketDeleted),
    test_serve_blk_stops_within_5s_and_keeps_a_file_that_replaced_its_socket:
        serve_blk(SocketReplaced),
    test_serve_rng_stops_within_5s_with_no_frontend: serve_rng(NoFrontend),
    test_serve_rng_stops_within_5s_with_an_idle_frontend: serve_rng(IdleFrontend),
    test_serve_rng_stops_within_5s_with_a_frontend_that_reads_no_reply: serve_rng(DeafFrontend),
    test_serve_rng_stops_within_5s_with_requests_in_flight: serve_rng(InFlight),
    test_serve_rng_stops_within_5s_with_its_socket_file_deleted: serve_rng(SocketDeleted),
    test_serve_rng_stops_within_5s_and_keeps_a_file_that_replaced_its_socket:
        serve_rng(SocketReplaced),
    test_run_stops_within_5s_with_no_frontend: run(NoFrontend),
    test_run_stops_within_5s_with_an_idle_frontend: run(IdleFrontend),
    test_run_stops_within_5s_with_a_frontend_that_reads_no_reply: run(DeafFrontend),
    test_run_stops_within_5s_with_requests_in_flight: run(InFlight),
    test_run_stops_within_5s_with_its_socket_files_deleted: run(SocketDeleted),
    test_run_stops_within_5s_and_keeps_files_that_replaced_its_sockets: run(SocketReplaced),
}

#[test]
fn test_serve_rng_stops_on_sigint_with_its_socket_file_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("rng.sock");
    let mut proc = Proc::start(
        dir.path(),
        &[
            "serve",
            "rng",
            "--socket-path",
            socket.to_str().expect("utf-8"),
        ],
    );
    wait_for_sockets(&mut proc, &[&socket]);
    tamper(State::SocketDeleted, &socket);
    proc.stop_with("INT", "serve rng, SIGINT, socket deleted");
}

#[test]
fn test_run_device_del_completes_with_the_socket_file_deleted_or_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, disk, rng, control) = start_run(dir.path());
    wait_for_sockets(&mut proc, &[&disk, &rng, &control]);
    tamper(State::SocketDeleted, &disk);
    tamper(State::SocketReplaced, &rng);
    for id in ["disk0", "rng0"] {
        let mut ctl = Command::new(switchboard_bin())
            .arg("ctl")
            .arg(&control)
            .arg("device-del")
            .arg(format!(r#"{{"id": "{id}"}}"#))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run switchboard ctl");
        match exit_within(&mut ctl, STOP_WITHIN) {
            Some(status) => assert!(status.success(), "device-del {id}: {status:?}"),
            None => panic!(
                "device-del {id} did not complete within {STOP_WITHIN:?}; stderr:\n{}",
                proc.stderr()
            ),
        }
    }
    check_after(State::SocketReplaced, &rng, "device-del rng0");
    proc.assert_running("after device-del");
    proc.stop_with("TERM", "run after device-del");
    check_after(State::NoFrontend, &control, "run: the control socket");
}

#[test]
fn test_serve_with_socket_fd_stops_within_5s_with_the_socket_file_deleted() {
    // A parent binds and listens, passes the socket as fd 3, then removes
    // the socket's path and sends SIGTERM.
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("inherited.sock");
    let script = r#"
import os, socket, subprocess, sys, time
path, exe = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(1)
fd = s.detach()
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
p = subprocess.Popen([exe, "serve", "rng", "--socket-fd", "3"], pass_fds=[3])
os.close(3)
c = socket.socket(socket.AF_UNIX)
c.settimeout(10)
c.connect(path)
# GET_FEATURES: answered once switchboard serves the socket.
c.sendall((1).to_bytes(4, "little") + (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
print("reply", len(c.recv(20)))
c.close()
os.remove(path)
start = time.monotonic()
p.terminate()
try:
    print("rc", p.wait(timeout=5))
except subprocess.TimeoutExpired:
    p.kill()
    print("timeout")
print("took", time.monotonic() - start)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&sock)
        .arg(switchboard_bin())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("reply 20"), "{stdout}\n{stderr}");
    assert!(stdout.contains("rc 0"), "{stdout}\n{stderr}");
}

/// `count()` once it has not changed for 200 ms (a disconnect's teardown
/// runs on the server's threads after the close), or its last value after
/// `within`.
fn settled(within: Duration, count: impl Fn() -> usize) -> usize {
    let start = Instant::now();
    let mut last = count();
    let mut since = Instant::now();
    while start.elapsed() < within {
        thread::sleep(Duration::from_millis(20));
        let n = count();
        if n != last {
            last = n;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(200) {
            break;
        }
    }
    last
}

/// One frontend with the full handshake (owner, features, memory table,
/// a queue), then a disconnect.
fn handshake(socket: &Path) {
    let fe = frontend::connect(socket, 1, 256).expect("frontend handshake");
    drop(fe);
}

#[test]
fn test_serve_blk_2000_connections_leak_no_descriptor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), 1 << 20);
    let socket = dir.path().join("blk.sock");
    let mut proc = Proc::start(
        dir.path(),
        &[
            "serve",
            "blk",
            "--path",
            img.to_str().expect("utf-8 path"),
            "--socket-path",
            socket.to_str().expect("utf-8 path"),
        ],
    );
    wait_for_sockets(&mut proc, &[&socket]);
    // A server keeps the last frontend's memory table until the next one
    // replaces it: measure after one handshake, and end with one, so that
    // both counts hold one table.
    handshake(&socket);
    let before = settled(Duration::from_secs(5), || proc.fds());
    let threads_before = settled(Duration::from_secs(5), || proc.threads());
    const CYCLES: usize = 2000;
    for i in 0..CYCLES {
        if i % 20 == 19 {
            handshake(&socket);
        } else {
            let s = UnixStream::connect(&socket).expect("connect");
            drop(s);
        }
        if i % 500 == 0 {
            proc.assert_running("connection cycles");
        }
    }
    // The last cycle (i = 1999) was a handshake. The server may still be
    // working through connections queued on its socket.
    let start = Instant::now();
    while (proc.fds(), proc.threads()) != (before, threads_before)
        && start.elapsed() < Duration::from_secs(10)
    {
        thread::sleep(Duration::from_millis(20));
    }
    let after = settled(Duration::from_secs(5), || proc.fds());
    let threads_after = settled(Duration::from_secs(5), || proc.threads());
    proc.assert_running("after the cycles");
    assert_eq!(
        after, before,
        "{CYCLES} connections changed the descriptor count from {before} to {after}"
    );
    assert_eq!(
        threads_after, threads_before,
        "{CYCLES} connections changed the thread count from {threads_before} to {threads_after}"
    );
    // And it still serves.
    handshake(&socket);
    proc.stop_with("TERM", "serve blk after 2000 connections");
}
