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
//! ```

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;

use actix::{Arbiter, System};
use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use switchboard_bus::BusHandle;
use switchboard_devices::error_chain;
use switchboard_devices::models::blk::{Blk, BlkOptions};
use switchboard_devices::models::rng::Rng;
use switchboard_devices::models::virtio::VirtioDevice;
use switchboard_devices::vhost_user::{
    check_socket_path, default_workers, serve, serve_unix_listener, StopHandle, VhostUserServer,
};
use switchboard_runtime::recording::{
    ActorInfo, DataMode, Header, LogFormat, RecordOptions, Recorder, WhenFull, DEFAULT_BUFFER,
};
use switchboard_runtime::Runtime;

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
    /// process exits 0.
    #[command(subcommand)]
    Serve(Device),
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
    Check {
        /// The topology file (JSON).
        file: PathBuf,
    },
    /// Start every device of a topology file in this process, until SIGINT or SIGTERM.
    ///
    /// The file is checked first (as `switchboard check` does; an invalid
    /// file exits 2 and starts nothing). Each device gets a one-line
    /// summary; vhost-user devices also get the QEMU arguments that connect
    /// to them. A device that fails to start is reported and the others
    /// keep running, unless --strict. With --control, a control socket
    /// takes QMP-style commands (see `switchboard ctl --help`). On SIGINT or
    /// SIGTERM every device is drained and stopped, then the process exits 0.
    Run {
        /// The topology file (JSON).
        file: PathBuf,
        /// Listen for control commands on this unix socket.
        #[arg(long, value_name = "SOCKET")]
        control: Option<PathBuf>,
        /// Stop everything and exit 1 if any device fails to start.
        #[arg(long)]
        strict: bool,
        /// Create each virtio-blk image that does not exist as a sparse file
        /// of SIZE bytes first (suffixes K, M, G: 64M).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        create_images: Option<u64>,
        #[command(flatten)]
        record: RecordArgs,
    },
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
    Replay {
        /// The log (written by --record).
        log: PathBuf,
        /// Replay only this device.
        #[arg(long, value_name = "ID")]
        device: Option<String>,
        /// Compare from this sequence number on.
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
        /// Stop after this sequence number.
        #[arg(long, value_name = "SEQ")]
        until: Option<u64>,
        /// Do not draw a progress bar (it is drawn only on a terminal).
        #[arg(long)]
        no_progress: bool,
    },
    /// Print a message log, filtered, or statistics about it.
    ///
    /// One line per record: sequence number, time, latency, sender and
    /// receiver, type, and payload and reply with bulk data abbreviated.
    /// --stats prints, per device and message type, the count and latency
    /// percentiles instead.
    Log {
        /// The log (written by --record).
        log: PathBuf,
        /// Only records to (or from) this device.
        #[arg(long, value_name = "ID")]
        device: Option<String>,
        /// Only records of this type (read, write, entropy, GET_CONFIG, ...).
        #[arg(long = "type", value_name = "T")]
        kind: Option<String>,
        /// From this sequence number on.
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
        /// Up to this sequence number.
        #[arg(long, value_name = "SEQ")]
        until: Option<u64>,
        /// Counts and latency percentiles per device and type.
        #[arg(long)]
        stats: bool,
        /// Print the matching records as they are in the log (JSON Lines).
        #[arg(long, conflicts_with = "stats")]
        json: bool,
    },
    /// Send one command to the control socket of a `switchboard run`.
    ///
    /// Commands: query-devices, query-stats, device-add ARGS (a device
    /// object as in a topology file), device-del '{"id": "disk0"}',
    /// query-commands. The reply is printed readably (a table for
    /// query-devices); an error reply is printed on stderr and exits 1.
    ///
    /// Example: switchboard ctl /run/sb.sock device-del '{"id": "disk0"}'
    Ctl {
        /// The control socket.
        socket: PathBuf,
        /// The command (QMP-style name).
        command: String,
        /// The command's arguments: a JSON object.
        arguments: Option<String>,
        /// Print the reply line as JSON, unformatted.
        #[arg(long)]
        json: bool,
    },
}

/// `64M` and the like, in bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 65536, 64M or 1G"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .filter(|b| *b >= 512)
        .ok_or_else(|| format!("'{s}' must be from 512 bytes to 16 EiB"))?;
    Ok(bytes)
}

#[derive(Debug, Subcommand)]
enum Device {
    /// virtio-blk on a raw image file.
    ///
    /// Serves read, write, flush, get-id, discard and write-zeroes. With
    /// --read-only the image is opened read-only and writes fail with
    /// VIRTIO_BLK_S_IOERR. Connect QEMU with
    /// `-chardev socket,id=c0,path=SOCKET -device vhost-user-blk-pci,chardev=c0,num-queues=N`
    /// (guest RAM must be shared: `-object memory-backend-memfd,id=mem,size=...,share=on
    /// -machine memory-backend=mem`).
    Blk {
        /// The raw image to serve (its size, rounded down to 512 bytes, is the disk's).
        #[arg(long, value_name = "IMAGE")]
        path: PathBuf,
        /// Open the image read-only; the guest sees a read-only disk.
        #[arg(long)]
        read_only: bool,
        /// Number of virtqueues. QEMU's vhost-user-blk-pci asks for one per vCPU
        /// unless given num-queues=N; it must not ask for more than this.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        queues: u16,
        /// Largest virtqueue size accepted (a power of two).
        #[arg(long, default_value_t = 256, value_parser = queue_size)]
        queue_size: u16,
        /// Threads doing file I/O.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        io_threads: u16,
        /// Threads walking the virtqueues (queues are spread over them;
        /// default: one per queue, at most one per CPU).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        workers: Option<u16>,
        /// The disk's serial number (GET_ID), at most 20 bytes (default: the
        /// image's file name, cut to 20 bytes).
        #[arg(long)]
        serial: Option<String>,
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        record: RecordArgs,
    },
    /// virtio-rng: entropy from the OS (getrandom).
    Rng {
        /// Most bytes per second handed to the guest (default: no limit).
        #[arg(long, value_name = "BYTES_PER_SECOND", value_parser = clap::value_parser!(u64).range(1..))]
        rate_limit: Option<u64>,
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        record: RecordArgs,
    },
}

fn queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number from 2 to 32768"))?;
    if n < 2 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two from 2 to 32768"));
    }
    Ok(n)
}

/// How bulk data goes into a log.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RecordData {
    /// A 128-bit XXH3 hash and the length of each buffer: small logs and
    /// little overhead; replay still checks every byte through the hashes,
    /// but cannot show differing bytes.
    Hash,
    /// The bytes themselves (base64): a disk request's data is held as
    /// read and as written, so logs grow by about 2.7 times the data moved;
    /// replay shows the first differing byte.
    Value,
}

/// What happens when the log's buffer is full.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RecordFull {
    /// The device waits for the log writer: nothing is lost.
    Wait,
    /// The record is dropped and a `gap` record says how many were.
    Gap,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RecordFormat {
    /// JSON Lines (version 1).
    Json,
    /// Binary frames with a CRC32C each (version 2, runtime/LOG-FORMAT.md):
    /// cheaper to write and to replay, and smaller.
    Binary,
}

#[derive(Debug, Args)]
struct RecordArgs {
    /// Record every message each device receives, with its reply and the
    /// data it read, to LOG (JSON Lines, see the README). LOG must not exist.
    #[arg(long, value_name = "LOG")]
    record: Option<PathBuf>,
    /// How bulk data (guest memory, file contents, entropy) is recorded.
    #[arg(long, value_enum, default_value_t = RecordData::Hash, value_name = "MODE")]
    record_data: RecordData,
    /// When the log's buffer is full: wait, or drop and mark a gap.
    #[arg(long, value_enum, default_value_t = RecordFull::Wait, value_name = "WHAT")]
    record_full: RecordFull,
    /// Records the log's buffer holds.
    #[arg(long, default_value_t = DEFAULT_BUFFER as u64, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    record_buffer: u64,
    /// The log's form. `switchboard log --json` shows either as JSON Lines.
    #[arg(long, value_enum, default_value_t = RecordFormat::Json, value_name = "FORM")]
    record_format: RecordFormat,
}

impl RecordArgs {
    /// Creates the log with its header, if --record was given.
    fn start(
        &self,
        topology: serde_json::Value,
        actors: Vec<ActorInfo>,
    ) -> anyhow::Result<Option<Recorder>> {
        let Some(path) = &self.record else {
            return Ok(None);
        };
        if path.exists() {
            bail!(
                "--record {}: the file exists; remove it or choose another path (a log is never overwritten)",
                path.display()
            );
        }
        let data = match self.record_data {
            RecordData::Hash => DataMode::Hash,
            RecordData::Value => DataMode::Value,
        };
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let header = Header::new(command, data, topology, actors);
        let options = RecordOptions {
            data,
            buffer: self.record_buffer as usize,
            when_full: match self.record_full {
                RecordFull::Wait => WhenFull::Wait,
                RecordFull::Gap => WhenFull::Gap,
            },
            format: match self.record_format {
                RecordFormat::Json => LogFormat::JsonLines,
                RecordFormat::Binary => LogFormat::Binary,
            },
        };
        let recorder = Recorder::create(path, &header, options)
            .with_context(|| format!("--record {}", path.display()))?;
        eprintln!(
            "switchboard: recording to {} ({} data)",
            path.display(),
            match self.record_data {
                RecordData::Hash => "hashed",
                RecordData::Value => "by-value",
            }
        );
        Ok(Some(recorder))
    }
}

/// Closes a log and says what it holds.
fn finish_recording(recorder: Option<Recorder>) -> anyhow::Result<()> {
    let Some(r) = recorder else {
        return Ok(());
    };
    let summary = r
        .finish()
        .with_context(|| format!("write the log {}", r.path().display()))?;
    eprintln!(
        "switchboard: recorded {} records ({} bytes) to {}{}",
        summary.records,
        summary.bytes,
        r.path().display(),
        if summary.dropped > 0 {
            format!(
                "; {} records were dropped (buffer full) and marked as gaps",
                summary.dropped
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

#[derive(Debug, Args)]
struct SocketArgs {
    /// Unix socket to listen on. With --socket-count N, sockets PATH0 .. PATH(N-1).
    /// A path that exists and is not a socket is refused, never deleted.
    #[arg(long, value_name = "PATH", required_unless_present = "socket_fd")]
    socket_path: Option<PathBuf>,
    /// An already-listening unix socket inherited as this file descriptor
    /// (as a service manager passes one). It is not removed on exit.
    #[arg(long, value_name = "FD", conflicts_with_all = ["socket_path", "socket_count"], value_parser = clap::value_parser!(i32).range(3..))]
    socket_fd: Option<i32>,
    /// Number of devices to serve, one per socket (with --socket-path).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    socket_count: u32,
}

/// Where one device is served.
#[derive(Debug)]
enum Endpoint {
    Path(PathBuf),
    Fd { fd: i32, listener: UnixListener },
}

impl Endpoint {
    fn name(&self) -> String {
        match self {
            Endpoint::Path(p) => p.display().to_string(),
            Endpoint::Fd { fd, .. } => format!("socket fd {fd}"),
        }
    }
}

/// Takes ownership of an inherited listening socket, after checking that
/// `fd` is an open socket.
fn inherited_listener(fd: i32) -> anyhow::Result<UnixListener> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .with_context(|| format!("--socket-fd {fd}: not an open file descriptor"))?;
    if !link.to_string_lossy().starts_with("socket:") {
        bail!(
            "--socket-fd {fd}: {} is not a socket",
            link.to_string_lossy()
        );
    }
    #[allow(unsafe_code)]
    // SAFETY: `fd` is open (its /proc link was just read) and is a socket.
    // Nothing else in this process owns it: it was inherited from the
    // parent (this runs during argument checking, before the process opens
    // any socket of its own, so a socket at `fd` cannot be one of ours),
    // and this runs once, as clap accepts a single --socket-fd.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if !rustix::net::sockopt::socket_acceptconn(&owned)
        .with_context(|| format!("--socket-fd {fd}: read its state"))?
    {
        bail!("--socket-fd {fd}: the socket is not listening");
    }
    let listener = UnixListener::from(owned);
    listener
        .local_addr()
        .with_context(|| format!("--socket-fd {fd}: not a unix socket"))?;
    Ok(listener)
}

impl SocketArgs {
    /// Checks the arguments and lists the endpoints.
    fn endpoints(self) -> anyhow::Result<Vec<Endpoint>> {
        if let Some(fd) = self.socket_fd {
            if self.socket_count != 1 {
                bail!("--socket-count works with --socket-path, not --socket-fd");
            }
            return Ok(vec![Endpoint::Fd {
                fd,
                listener: inherited_listener(fd)?,
            }]);
        }
        let Some(base) = self.socket_path else {
            bail!("give --socket-path or --socket-fd");
        };
        let sockets = if self.socket_count == 1 {
            vec![base]
        } else {
            (0..self.socket_count)
                .map(|i| {
                    let mut p = base.clone().into_os_string();
                    p.push(i.to_string());
                    PathBuf::from(p)
                })
                .collect()
        };
        for path in &sockets {
            check_socket_path(path).with_context(|| format!("--socket-path {}", path.display()))?;
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(dir) = parent {
                if !dir.is_dir() {
                    bail!(
                        "--socket-path {}: directory {} does not exist",
                        path.display(),
                        dir.display()
                    );
                }
            }
        }
        Ok(sockets.into_iter().map(Endpoint::Path).collect())
    }
}

/// Starts the actor system that owns the guest-memory buses; returns a
/// handle to start buses on.
fn start_actors() -> anyhow::Result<actix::ArbiterHandle> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::Builder::new()
        .name("actors".into())
        .spawn(move || {
            System::new().block_on(async move {
                let _ = tx.send(Arbiter::current());
                futures::future::pending::<()>().await;
            });
        })
        .context("start the actor thread")?;
    rx.recv().context("actor thread died")
}

/// Serves one device per endpoint (made by `make`) until SIGINT or
/// SIGTERM; then drains each and returns.
fn serve_all<D: VirtioDevice>(
    endpoints: Vec<Endpoint>,
    workers: usize,
    record: Option<(&RecordArgs, &str, serde_json::Value)>,
    make: impl Fn(usize) -> anyhow::Result<Arc<D>>,
) -> anyhow::Result<()> {
    let devices = (0..endpoints.len())
        .map(&make)
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The log's header names each device as `<short><i>` (`blk0`).
    let recorder = match record {
        Some((args, short, ref spec)) => {
            let mut specs = Vec::new();
            let mut actors = Vec::new();
            for (i, (device, endpoint)) in devices.iter().zip(&endpoints).enumerate() {
                let id = format!("{short}{i}");
                let mut spec = spec.clone();
                spec["id"] = serde_json::json!(id);
                spec["vhost_user"]["socket"] = serde_json::json!(endpoint.name());
                specs.push(spec);
                actors.push(switchboard_devices::models::virtio::actor_info(
                    &**device, &id,
                ));
            }
            args.start(serde_json::json!({ "devices": specs }), actors)?
        }
        None => None,
    };
    // Signals first: a signal that arrives while devices start is not lost.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("install signal handlers")?;
    let arbiter = start_actors()?;
    // The one writer of the log: every server records through it.
    let runtime = match &recorder {
        Some(r) => Runtime::with_journal(Arc::new(
            switchboard_runtime::journal::RecordJournal::new(r.clone()),
        )),
        None => Runtime::new(),
    };
    let mut stops = Vec::new();
    let mut threads = Vec::new();
    for (i, (endpoint, device)) in endpoints.into_iter().zip(devices).enumerate() {
        let kind = device.kind();
        let bus = BusHandle::start(&runtime, &format!("{kind}{i}-guest-memory"), &arbiter);
        let name = match &record {
            Some((_, short, _)) => format!("{short}{i}"),
            None => format!("{kind}{i}"),
        };
        let server = VhostUserServer::with_runtime(device, bus, workers, &runtime, name.clone())?;
        if let Some(journal) = runtime.journal() {
            // The header already describes it; record_to adds an `added`
            // record too, which replay takes as the same description.
            server.record_to(Arc::clone(journal), &name);
        }
        let stop = StopHandle::default();
        stops.push(stop.clone());
        let name = endpoint.name();
        eprintln!("switchboard: serving {kind} on {name}");
        threads.push(
            thread::Builder::new()
                .name(format!("serve:{name}"))
                .spawn(move || {
                    let r = match endpoint {
                        Endpoint::Path(path) => serve(server, &path, &stop),
                        Endpoint::Fd { listener, .. } => {
                            serve_unix_listener(server, listener, &name, &stop)
                        }
                    };
                    (name, r)
                })
                .context("start a server thread")?,
        );
    }
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                eprintln!("switchboard: signal {sig}: draining and stopping");
                for s in &stops {
                    s.stop();
                }
            }
        })
        .context("start the signal thread")?;
    let mut failed = false;
    for t in threads {
        match t.join() {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(e))) => {
                failed = true;
                eprintln!("switchboard: {name}: {}", error_chain(&e));
            }
            Err(_) => {
                failed = true;
                eprintln!("switchboard: a server thread panicked");
            }
        }
    }
    finish_recording(recorder)?;
    if failed {
        bail!("some devices failed");
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { file } => check(&file),
        Command::Run {
            file,
            control,
            strict,
            create_images,
            record,
        } => run_topology(&file, control.as_deref(), strict, create_images, &record),
        Command::Replay {
            log,
            device,
            from,
            until,
            no_progress,
        } => replay_log(
            &log,
            &switchboard_devices::log::replay::ReplayOptions {
                device,
                from,
                until,
                progress: !no_progress,
            },
        ),
        Command::Log {
            log,
            device,
            kind,
            from,
            until,
            stats,
            json,
        } => show_log(
            &log,
            &switchboard_devices::log::inspect::InspectOptions {
                device,
                kind,
                from,
                until,
                stats,
                json,
            },
        ),
        Command::Ctl {
            socket,
            command,
            arguments,
            json,
        } => ctl(&socket, &command, arguments.as_deref(), json),
        Command::Serve(Device::Rng {
            socket,
            rate_limit,
            record,
        }) => {
            let endpoints = socket.endpoints()?;
            let spec = serde_json::json!({
                "kind": "virtio-rng", "rate_limit": rate_limit, "vhost_user": {}
            });
            serve_all(endpoints, 1, Some((&record, "rng", spec)), |_| {
                Ok(Arc::new(
                    Rng::new(rate_limit).context("start the rate limiter")?,
                ))
            })
        }
        Command::Serve(Device::Blk {
            path,
            read_only,
            queues,
            queue_size,
            io_threads,
            workers,
            serial,
            socket,
            record,
        }) => {
            if socket.socket_count > 1 && !read_only {
                bail!(
                    "--socket-count {} would let {} guests write one image; \
                     it is allowed only with --read-only",
                    socket.socket_count,
                    socket.socket_count
                );
            }
            let options = BlkOptions {
                read_only,
                queues,
                queue_size,
                io_threads: usize::from(io_threads),
                serial,
                ..BlkOptions::default()
            };
            // Open the image before touching any socket: a bad image is
            // reported without side effects.
            let first =
                Blk::open(&path, &options).with_context(|| format!("--path {}", path.display()))?;
            let endpoints = socket.endpoints()?;
            let workers = workers.map_or_else(|| default_workers(usize::from(queues)), usize::from);
            let first = std::sync::Mutex::new(Some(first));
            let spec = serde_json::json!({
                "kind": "virtio-blk", "path": path, "read_only": read_only,
                "vhost_user": { "queues": queues }
            });
            serve_all(endpoints, workers, Some((&record, "blk", spec)), |_| {
                let taken = first.lock().unwrap_or_else(|e| e.into_inner()).take();
                let blk = match taken {
                    Some(b) => b,
                    None => Blk::open(&path, &options)
                        .with_context(|| format!("--path {}", path.display()))?,
                };
                Ok(Arc::new(blk))
            })
        }
    }
}

/// A topology file that `check` found invalid; its errors are already
/// printed. `main` exits 2 for it.
#[derive(Debug)]
struct InvalidTopology {
    file: PathBuf,
    errors: usize,
}

impl std::fmt::Display for InvalidTopology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.errors == 1 { "" } else { "s" };
        write!(f, "{}: {} error{s}", self.file.display(), self.errors)
    }
}

impl std::error::Error for InvalidTopology {}

fn check(file: &std::path::Path) -> anyhow::Result<()> {
    let count =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    match switchboard_devices::host::topology::check_file(file) {
        Ok(t) => {
            println!(
                "{}: {} on {}: OK",
                file.display(),
                count(t.devices.len(), "device", "devices"),
                count(t.buses.len(), "bus", "buses")
            );
            Ok(())
        }
        Err(diagnostics) => {
            for d in &diagnostics {
                eprintln!("{}", d.in_file(file));
            }
            Err(InvalidTopology {
                file: file.to_path_buf(),
                errors: diagnostics.len(),
            }
            .into())
        }
    }
}

/// Prints a line on stdout, ignoring a closed stdout: a long-running
/// `run` must not die because whoever read its summary went away.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Creates the missing virtio-blk images of `file` as sparse files.
fn create_images(file: &std::path::Path, size: u64) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    // An unparsable file is left for the check to report.
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(());
    };
    let base = file.parent().unwrap_or(std::path::Path::new(""));
    let devices = value["devices"].as_array().cloned().unwrap_or_default();
    for d in devices {
        if d["kind"] != "virtio-blk" {
            continue;
        }
        let Some(path) = d["path"].as_str() else {
            continue;
        };
        let path = base.join(path);
        if path.exists() {
            continue;
        }
        std::fs::File::create_new(&path)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("create the image {}", path.display()))?;
        eprintln!(
            "switchboard: created {} ({} MiB, sparse)",
            path.display(),
            size >> 20
        );
    }
    Ok(())
}

fn run_topology(
    file: &std::path::Path,
    control: Option<&std::path::Path>,
    strict: bool,
    create: Option<u64>,
    record: &RecordArgs,
) -> anyhow::Result<()> {
    use switchboard_devices::host::control::ControlServer;
    use switchboard_devices::host::runner::Runner;

    // Signals first: a signal that arrives while devices start is not lost.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("install signal handlers")?;
    if let Some(size) = create {
        create_images(file, size)?;
    }
    let topology = match switchboard_devices::host::topology::check_file(file) {
        Ok(t) => t,
        Err(diagnostics) => {
            for d in &diagnostics {
                eprintln!("{}", d.in_file(file));
            }
            return Err(InvalidTopology {
                file: file.to_path_buf(),
                errors: diagnostics.len(),
            }
            .into());
        }
    };
    if let Some(c) = control {
        check_socket_path(c).with_context(|| format!("--control {}", c.display()))?;
    }
    let base = file.parent().unwrap_or(std::path::Path::new(""));
    let recorder = record.start(
        serde_json::to_value(&topology).context("the topology as JSON")?,
        switchboard_devices::host::runner::log_actors(&topology),
    )?;
    let t0 = std::time::Instant::now();
    let (runner, started) =
        Runner::start_recording(topology, base, recorder.clone()).context("start the runtime")?;
    let elapsed = t0.elapsed();
    let runner = Arc::new(runner);
    let mut failed = 0;
    for s in &started {
        match &s.result {
            Ok(what) => say!("{}: {what}", s.id),
            Err(why) => {
                failed += 1;
                eprintln!("{}: FAILED: {why}", s.id);
            }
        }
    }
    if failed > 0 && strict {
        runner.shutdown();
        finish_recording(recorder)?;
        bail!(
            "{failed} of {} devices did not start (--strict)",
            started.len()
        );
    }
    let server = match control {
        Some(c) => {
            let server = ControlServer::start(c, runner.clone())
                .with_context(|| format!("--control {}", c.display()))?;
            runner.set_events(server.events());
            Some(server)
        }
        None => None,
    };
    say!(
        "switchboard: {} of {} devices running (started in {} ms){}; SIGINT or SIGTERM stops",
        started.len() - failed,
        started.len(),
        elapsed.as_millis(),
        control
            .map(|c| format!("; control socket {}", c.display()))
            .unwrap_or_default()
    );
    if let Some(qemu) = runner.qemu_command() {
        say!("connect QEMU with:\n  {qemu}");
    }
    if let Some(sig) = signals.forever().next() {
        eprintln!("switchboard: signal {sig}: draining every device");
    }
    let t1 = std::time::Instant::now();
    let results = runner.shutdown();
    let mut errors = 0;
    for (id, r) in &results {
        if let Err(e) = r {
            errors += 1;
            eprintln!("switchboard: {id}: {e}");
        }
    }
    if let Some(s) = server {
        s.stop();
    }
    eprintln!(
        "switchboard: stopped {} devices in {} ms",
        results.len(),
        t1.elapsed().as_millis()
    );
    finish_recording(recorder)?;
    if errors > 0 {
        bail!("{errors} devices did not stop cleanly");
    }
    Ok(())
}

/// A replay that found a divergence (exit 1); already printed.
#[derive(Debug)]
struct Diverged;

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the replay diverged from the recording")
    }
}

impl std::error::Error for Diverged {}

/// A log that cannot be read (exit 2).
#[derive(Debug)]
struct BadLog(String);

impl std::fmt::Display for BadLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadLog {}

fn print_replayed(r: &switchboard_devices::log::replay::ReplayReport) {
    for (id, n) in &r.per_actor {
        say!("  {id}: {n} messages replayed, all matched");
    }
    for (id, (n, why)) in &r.not_replayable {
        say!("  {id}: {n} messages not replayed: {why}");
    }
    if r.gaps > 0 {
        say!(
            "  {} gaps in the log: {} records were dropped while recording and could not be checked",
            r.gaps, r.dropped
        );
    }
}

fn replay_log(
    log: &std::path::Path,
    options: &switchboard_devices::log::replay::ReplayOptions,
) -> anyhow::Result<()> {
    use switchboard_devices::log::replay::{replay, ReplayError};
    match replay(log, options) {
        Ok(report) => {
            say!(
                "{}: {} messages replayed, 0 divergences ({} records read, {} outside the selection)",
                log.display(),
                report.replayed(),
                report.records,
                report.skipped
            );
            print_replayed(&report);
            Ok(())
        }
        Err(ReplayError::Diverged(d)) => {
            say!("{}: {d}", log.display());
            Err(Diverged.into())
        }
        Err(ReplayError::Log { error, replayed }) => {
            let truncated = matches!(
                error,
                switchboard_runtime::recording::LogError::Truncated { .. }
            );
            if replayed.records == 0 && !truncated {
                return Err(BadLog(error.to_string()).into());
            }
            say!(
                "{}: the {} messages before the damage replayed with 0 divergences",
                log.display(),
                replayed.replayed()
            );
            print_replayed(&replayed);
            Err(BadLog(error.to_string()).into())
        }
        Err(e @ ReplayError::Rebuild { .. }) => Err(BadLog(e.to_string()).into()),
    }
}

fn show_log(
    log: &std::path::Path,
    options: &switchboard_devices::log::inspect::InspectOptions,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = switchboard_devices::log::inspect::inspect(log, options, &mut out);
    let _ = std::io::Write::flush(&mut out);
    match result {
        Ok(_) => Ok(()),
        // `switchboard log LOG | head`: the reader left; stop quietly.
        Err(e) if e.is_closed_output() => Ok(()),
        Err(e) => Err(BadLog(e.to_string()).into()),
    }
}

fn ctl(
    socket: &std::path::Path,
    command: &str,
    arguments: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    use switchboard_devices::host::control::Client;

    let arguments = arguments
        .map(|a| {
            let v: serde_json::Value =
                serde_json::from_str(a).with_context(|| format!("ARGUMENTS {a:?} is not JSON"))?;
            if !v.is_object() {
                bail!("ARGUMENTS must be a JSON object, like '{{\"id\": \"disk0\"}}'");
            }
            Ok(v)
        })
        .transpose()?;
    let mut client = Client::connect(socket)
        .with_context(|| format!("connect to the control socket {}", socket.display()))?;
    let reply = client
        .execute(command, arguments)
        .with_context(|| format!("{command} on {}", socket.display()))?;
    if json {
        println!("{reply}");
    }
    if let Some(e) = reply.get("error") {
        bail!(
            "{}: {}",
            e["class"].as_str().unwrap_or("Error"),
            e["desc"].as_str().unwrap_or("")
        );
    }
    if json {
        return Ok(());
    }
    let ret = &reply["return"];
    match (command, ret.as_array()) {
        ("query-devices", Some(devices)) => {
            println!(
                "{:<16} {:<12} {:<12} {:>9} {:>10}  AT",
                "ID", "KIND", "STATE", "IN-FLIGHT", "HANDLED"
            );
            for d in devices {
                println!(
                    "{:<16} {:<12} {:<12} {:>9} {:>10}  {}",
                    d["id"].as_str().unwrap_or("?"),
                    d["kind"].as_str().unwrap_or("?"),
                    d["state"].as_str().unwrap_or("?"),
                    d["in_flight"].as_u64().unwrap_or(0),
                    d["handled"].as_u64().unwrap_or(0),
                    d["at"].as_str().unwrap_or("")
                );
            }
        }
        _ => println!(
            "{}",
            serde_json::to_string_pretty(ret).unwrap_or_else(|_| ret.to_string())
        ),
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Diverged>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("switchboard: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if e.is::<InvalidTopology>() || e.is::<BadLog>() {
                return ExitCode::from(2);
            }
            ExitCode::FAILURE
        }
    }
}
