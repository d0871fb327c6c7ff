// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `switchboard` command: serves device actors to VMs.
//!
//! ```text
//! switchboard serve rng --socket-path /tmp/rng.sock [--rate-limit 65536]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;

use actix::{Arbiter, System};
use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use switchboard_bus::BusHandle;
use switchboard_devices::rng::Rng;
use switchboard_devices::vhost_user::{serve, StopHandle, VhostUserServer};
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
    /// completed, the socket file is removed, and the process exits 0.
    #[command(subcommand)]
    Serve(Device),
}

#[derive(Debug, Subcommand)]
enum Device {
    /// virtio-rng: entropy from the OS (getrandom).
    Rng {
        #[command(flatten)]
        socket: SocketArgs,
        /// Most bytes per second handed to the guest (default: no limit).
        #[arg(long, value_name = "BYTES_PER_SECOND", value_parser = clap::value_parser!(u64).range(1..))]
        rate_limit: Option<u64>,
    },
}

#[derive(Debug, Args)]
struct SocketArgs {
    /// Unix socket to listen on. With --socket-count N, sockets PATH0 .. PATH(N-1).
    #[arg(long, value_name = "PATH")]
    socket_path: PathBuf,
    /// Number of devices to serve, one per socket.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    socket_count: u32,
}

/// The validated form of `serve rng`.
struct RngConfig {
    sockets: Vec<PathBuf>,
    rate_limit: Option<u64>,
}

impl TryFrom<(SocketArgs, Option<u64>)> for RngConfig {
    type Error = anyhow::Error;

    fn try_from((socket, rate_limit): (SocketArgs, Option<u64>)) -> anyhow::Result<Self> {
        let sockets = if socket.socket_count == 1 {
            vec![socket.socket_path]
        } else {
            (0..socket.socket_count)
                .map(|i| {
                    let mut p = socket.socket_path.clone().into_os_string();
                    p.push(i.to_string());
                    PathBuf::from(p)
                })
                .collect()
        };
        for path in &sockets {
            switchboard_devices::vhost_user::check_socket_path(path)
                .with_context(|| format!("--socket-path {}", path.display()))?;
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
        Ok(RngConfig {
            sockets,
            rate_limit,
        })
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

fn serve_rng(config: RngConfig) -> anyhow::Result<()> {
    let arbiter = start_actors()?;
    let runtime = Runtime::new();
    let mut stops = Vec::new();
    let mut threads = Vec::new();
    for (i, path) in config.sockets.iter().enumerate() {
        let bus = BusHandle::start(&runtime, &format!("rng{i}-guest-memory"), &arbiter);
        let device = Arc::new(Rng::new(config.rate_limit).context("start the rate limiter")?);
        let server = VhostUserServer::new(device, bus, 1)?;
        let stop = StopHandle::default();
        stops.push(stop.clone());
        let path = path.clone();
        threads.push(
            thread::Builder::new()
                .name(format!("serve:{}", path.display()))
                .spawn(move || {
                    let r = serve(server, &path, &stop);
                    (path, r)
                })
                .context("start a server thread")?,
        );
        eprintln!(
            "switchboard: serving virtio-rng on {}",
            config.sockets[i].display()
        );
    }
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("install signal handlers")?;
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
            Ok((path, Err(e))) => {
                failed = true;
                eprintln!("switchboard: {}: {}", path.display(), error_chain(&e));
            }
            Err(_) => {
                failed = true;
                eprintln!("switchboard: a server thread panicked");
            }
        }
    }
    if failed {
        bail!("some devices failed");
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(Device::Rng { socket, rate_limit }) => {
            serve_rng(RngConfig::try_from((socket, rate_limit))?)
        }
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
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
