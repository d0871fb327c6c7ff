// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The real `switchboard` binary as a test runs it: started in a directory
//! with its stderr kept in a file, asserted alive, stopped with SIGTERM and
//! killed if the test ends early; and the control-socket calls the tests
//! make of it.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard_devices::host::control::Client;

use crate::switchboard_bin;

/// How long a test waits for the process to do what it was asked.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running `switchboard` command; killed if the test ends early.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    stderr: PathBuf,
}

impl Proc {
    /// Starts `switchboard ARGS` in `dir` (stderr to `DIR/stderr.txt`) and
    /// waits for `sockets` to exist.
    pub fn start(dir: &Path, args: &[&str], sockets: &[&Path]) -> Proc {
        let stderr = dir.join("stderr.txt");
        let child = Command::new(switchboard_bin())
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start switchboard");
        let mut proc = Proc { child, stderr };
        let start = Instant::now();
        while !sockets.iter().all(|s| s.exists()) {
            proc.assert_alive("starting");
            assert!(start.elapsed() < Duration::from_secs(120), "no sockets");
            thread::sleep(Duration::from_millis(10));
        }
        proc
    }

    /// `switchboard run DIR/topology.json --control DIR/ctl.sock` (the
    /// topology written there first), once `sockets` (relative to `dir`)
    /// and the control socket exist; and its control client.
    pub fn run(dir: &Path, topology: &Value, sockets: &[&str]) -> (Proc, Client) {
        let file = dir.join("topology.json");
        std::fs::write(&file, topology.to_string()).expect("write the topology");
        let ctl = dir.join("ctl.sock");
        let mut wait: Vec<PathBuf> = sockets.iter().map(|s| dir.join(s)).collect();
        wait.push(ctl.clone());
        let wait: Vec<&Path> = wait.iter().map(PathBuf::as_path).collect();
        let args = [
            "run",
            file.to_str().expect("utf-8 path"),
            "--control",
            ctl.to_str().expect("utf-8 path"),
        ];
        let proc = Proc::start(dir, &args, &wait);
        let client = Client::connect(&ctl).expect("control socket");
        (proc, client)
    }

    /// What it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.stderr) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The process is still running (no SIGBUS, no exit).
    pub fn assert_alive(&mut self, what: &str) {
        if let Some(status) = self.child.try_wait().expect("wait") {
            panic!("{what}: switchboard ended: {status:?}\n{}", self.stderr());
        }
    }

    /// Waits (at most [`WAIT`]) for the process to exit by itself.
    pub fn exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(start.elapsed() < WAIT, "no exit within {WAIT:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then the exit status (within [`WAIT`]).
    pub fn terminate(mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        self.exit()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it is true, for at most [`WAIT`].
pub fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out: {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// One control command; its whole reply (a `return` or an `error`).
pub fn execute(ctl: &mut Client, command: &str, arguments: Option<Value>) -> Value {
    ctl.execute(command, arguments)
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}

/// `query-devices`' entry for `id`, if listed.
pub fn device(ctl: &mut Client, id: &str) -> Option<Value> {
    let reply = execute(ctl, "query-devices", None);
    reply["return"]
        .as_array()
        .unwrap_or_else(|| panic!("query-devices: {reply}"))
        .iter()
        .find(|d| d["id"] == id)
        .cloned()
}
