// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `switchboard` command: serves device actors to VMs.
//!
//! ```text
//! switchboard serve blk --path disk.img --socket-path /tmp/blk.sock [--read-only] [--queues 2]
//! switchboard serve rng --socket-path /tmp/rng.sock [--rate-limit 65536]
//! switchboard serve rng --socket-fd 3
//! switchboard check topology.json
//! switchboard run topology.json --record run.log
//! switchboard replay run.log
//! switchboard log run.log --stats
//! switchboard log run.log --convert run.bin
//! switchboard ctl /run/sb.sock query-devices
//! ```
//!
//! Each subcommand is a module: its arguments (clap), the checked
//! configuration they convert to, and the call into the library. `serve`
//! and `run` share one path ([`run::session`]): `serve` builds a topology
//! of its device and starts it with the same runner as a topology file, so
//! signals, recording, stop and their messages exist once.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Prints a line on stdout, ignoring a closed stdout: a long-running
/// `run` must not die because whoever read its summary went away.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod check;
mod ctl;
mod log;
mod record;
mod replay;
mod run;
mod serve;

/// A typed actor runtime for virtual-machine devices.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one device as a vhost-user backend until SIGINT or SIGTERM.
    ///
    /// Each frontend (QEMU's vhost-user-*-pci with a chardev on the socket)
    /// is served until it disconnects; the socket then accepts the next one
    /// (QEMU's reconnect=). On SIGINT or SIGTERM every request in flight is
    /// completed, the frontend is disconnected, the socket file is removed
    /// (if it is still this socket: a file put in its place stays), and the
    /// process exits 0. It also ends once every device it serves has
    /// stopped by itself (a device that failed). The device is started as
    /// `switchboard run` starts a topology's devices.
    #[command(subcommand)]
    Serve(serve::Device),
    /// Check a topology file without starting anything.
    ///
    /// Exits 0 and prints a one-line summary if FILE is valid. Otherwise
    /// exits 2 and prints every error found on stderr, one per line, as
    /// `FILE:LINE:COLUMN: JSON.PATH: what is wrong, what was expected`:
    /// JSON syntax, types, unknown and missing fields, and what the types
    /// cannot say (duplicate ids, unknown buses, overlapping regions, images
    /// that are missing or cannot be opened as asked, socket paths that exist
    /// and are not sockets, queue counts out of range, ...). Relative paths
    /// in FILE are taken from FILE's directory.
    Check(check::CheckArgs),
    /// Start every device of a topology file in this process, until SIGINT or SIGTERM.
    ///
    /// The file is checked first (as `switchboard check` does; an invalid
    /// file exits 2 and starts nothing). Each device gets a one-line
    /// summary; vhost-user devices also get the QEMU arguments that connect
    /// to them. A device that fails to start is reported and the others
    /// keep running, unless --strict. With --control, a control socket
    /// takes QMP-style commands (see `switchboard ctl --help`). On SIGINT or
    /// SIGTERM every device is drained and stopped, then the process exits 0.
    Run(run::RunArgs),
    /// Replay a message log and check that every device answers as recorded.
    ///
    /// Each recorded device is rebuilt from the log (no image, guest,
    /// entropy source or UART sink needed: their data is in the log) and
    /// fed its recorded messages in order; every reply, guest-memory write,
    /// effect on the outside (file writes, flushes, ...) and interrupt
    /// message is compared with the recorded one. Exits 0 when all match. At the first difference,
    /// prints its sequence number, the message, expected against actual
    /// and the last messages that device handled, and exits 1. A log that
    /// cannot be read (cut off, malformed, from a newer switchboard) exits
    /// 2, after replaying what comes before the damage.
    Replay(replay::ReplayArgs),
    /// Print a message log, filtered, or statistics about it.
    ///
    /// One line per record: sequence number, time, latency, sender and
    /// receiver, type, and payload and reply with bulk data abbreviated.
    /// --stats prints, per device and message type, the count and latency
    /// percentiles instead. --convert OUT writes the log, record for
    /// record, in the other form (JSON Lines or binary) instead.
    Log(log::LogArgs),
    /// Send one command to the control socket of a `switchboard run`.
    ///
    /// Commands: query-devices, query-stats, query-failures, device-add ARGS
    /// (a device object as in a topology file), device-del '{"id": "disk0"}',
    /// bus-read BUS ADDR SIZE, bus-write BUS ADDR SIZE VALUE (one access
    /// to a bus, as a guest makes it; numbers decimal or 0x hex, SIZE 1, 2,
    /// 4 or 8; bus-read prints the value in hex; unassigned space reads
    /// all-ones), query-commands. The reply is printed readably (a table
    /// for query-devices); an error reply is printed on stderr and exits 1.
    ///
    /// Examples: switchboard ctl /run/sb.sock device-del '{"id": "disk0"}';
    /// switchboard ctl /run/sb.sock bus-write pio0 0x3f8 1 65
    Ctl(ctl::CtlArgs),
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(device) => serve::serve(device.try_into()?),
        Command::Check(args) => check::check(&args.file),
        Command::Run(args) => run::run(args.into()),
        Command::Replay(args) => replay::replay(&args.into()),
        Command::Log(args) => log::show(&args.into()),
        Command::Ctl(args) => ctl::ctl(args.try_into()?),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match execute(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        // The divergence is already printed, on stdout.
        Err(e) if e.is::<replay::Diverged>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("switchboard: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if e.is::<check::InvalidTopology>() || e.is::<replay::BadLog>() {
                return ExitCode::from(2);
            }
            ExitCode::FAILURE
        }
    }
}
