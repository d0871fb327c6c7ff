// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard serve`: one device (or one per socket) from the command
//! line, as a topology of that device started like `switchboard run`'s
//! ([`crate::run::session`]).

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use switchboard_devices::host::fleet::Serving;
use switchboard_devices::host::runner::{StartOptions, Tuning};
use switchboard_devices::host::topology::{
    BlkSpec, DeviceSpec, RestartLimits, RestartPolicy, RngSpec, Topology, VhostUserSpec,
};
use switchboard_devices::models::blk::MAX_QUEUES;
use switchboard_devices::models::blk::{Blk, BlkOptions, PanicFault};
use switchboard_devices::models::rng::Rng;
use switchboard_devices::models::virtio::actor_info;
use switchboard_devices::vhost_user::{check_socket_path, BoundSocket};
use switchboard_runtime::recording::ActorInfo;
use switchboard_runtime::DeviceId;

use crate::record::{RecordArgs, Recording};
use crate::run::{self, Mode, Session};

/// The device to serve.
#[derive(Debug, Subcommand)]
pub(crate) enum Device {
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
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
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
        /// Test only: every file operation waits this many milliseconds
        /// plus a random part of as much again (a slow disk whose requests
        /// complete out of order).
        #[arg(long, value_name = "MS", hide = true)]
        test_latency_ms: Option<u64>,
        /// Test only: with --test-latency-ms, every Nth file operation
        /// (counted over the device) waits ten times MS instead, so that
        /// some request is always held while later ones complete.
        #[arg(long, value_name = "N", hide = true, requires = "test_latency_ms",
              value_parser = clap::value_parser!(u64).range(1..))]
        test_slow_every: Option<u64>,
        /// Test only: the request handler panics on request N (counted over
        /// the process, restarts included), once.
        #[arg(long, value_name = "N", hide = true, value_parser = clap::value_parser!(u64).range(1..))]
        test_panic_at: Option<u64>,
        /// Test only: with --test-panic-at, panic on every request from N on.
        #[arg(long, hide = true, requires = "test_panic_at")]
        test_panic_every: bool,
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        restart: RestartArgs,
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
        restart: RestartArgs,
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

/// Where the devices listen.
#[derive(Debug, Args)]
pub(crate) struct SocketArgs {
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

/// Whether a failed device is restarted.
#[derive(Debug, Args)]
pub(crate) struct RestartArgs {
    /// Restart a device that failed (a contained panic, a shrunk memory
    /// file) on its socket, at most N times in the run; after that it stays
    /// stopped. Default: never restarted.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    restart_limit: Option<u64>,
    /// Milliseconds from a failure to its restart, doubled for each restart
    /// after the first, at most 5000 (or this, if larger; at most one hour).
    #[arg(long, value_name = "MS", requires = "restart_limit")]
    restart_backoff_ms: Option<u64>,
}

impl TryFrom<RestartArgs> for RestartPolicy {
    type Error = anyhow::Error;

    fn try_from(args: RestartArgs) -> anyhow::Result<Self> {
        let Some(limit) = args.restart_limit else {
            return Ok(RestartPolicy::Never);
        };
        let mut limits = RestartLimits::new(limit);
        if let Some(ms) = args.restart_backoff_ms {
            limits.backoff_ms = ms;
            limits.max_backoff_ms = limits.max_backoff_ms.max(ms);
        }
        let policy = RestartPolicy::Limited(limits);
        if let Some(e) = policy.check().first() {
            bail!("--restart-backoff-ms: {}", e.message);
        }
        Ok(policy)
    }
}

/// Where one device is served.
#[derive(Debug)]
enum Endpoint {
    Path(PathBuf),
    Fd { fd: i32, listener: UnixListener },
}

impl Endpoint {
    /// What messages call it.
    fn name(&self) -> String {
        match self {
            Endpoint::Path(p) => p.display().to_string(),
            Endpoint::Fd { fd, .. } => format!("socket fd {fd}"),
        }
    }

    /// The socket path the device's topology entry names: for an
    /// inherited socket, the path it was bound to, if it has one.
    fn socket_path(&self) -> PathBuf {
        match self {
            Endpoint::Path(p) => p.clone(),
            Endpoint::Fd { listener, .. } => listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from(self.name())),
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
    // parent (this runs during argument checking, the first thing `main`
    // does after parsing, before the process opens any socket of its own,
    // so a socket at `fd` cannot be one of ours), and this runs once, as
    // clap accepts a single --socket-fd.
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

impl TryFrom<SocketArgs> for Vec<Endpoint> {
    type Error = anyhow::Error;

    /// Checks the arguments and lists the endpoints: takes the inherited
    /// socket, or checks each socket path (it may not exist, or be a stale
    /// socket, and its directory must exist).
    fn try_from(args: SocketArgs) -> anyhow::Result<Self> {
        if let Some(fd) = args.socket_fd {
            if args.socket_count != 1 {
                bail!("--socket-count works with --socket-path, not --socket-fd");
            }
            return Ok(vec![Endpoint::Fd {
                fd,
                listener: inherited_listener(fd)?,
            }]);
        }
        let Some(base) = args.socket_path else {
            bail!("give --socket-path or --socket-fd");
        };
        let sockets = if args.socket_count == 1 {
            vec![base]
        } else {
            (0..args.socket_count)
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

/// The device model and its options, checked by clap.
#[derive(Debug)]
enum Model {
    Blk { path: PathBuf, options: BlkOptions },
    Rng { rate_limit: Option<u64> },
}

/// What `switchboard serve` was asked to serve.
#[derive(Debug)]
pub(crate) struct ServeConfig {
    model: Model,
    /// One device per endpoint.
    endpoints: Vec<Endpoint>,
    workers: Option<usize>,
    /// What is done when a device fails.
    restart: RestartPolicy,
    record: Recording,
}

impl TryFrom<Device> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(device: Device) -> anyhow::Result<Self> {
        match device {
            Device::Blk {
                path,
                read_only,
                queues,
                queue_size,
                io_threads,
                workers,
                serial,
                test_latency_ms,
                test_slow_every,
                test_panic_at,
                test_panic_every,
                socket,
                restart,
                record,
            } => {
                if socket.socket_count > 1 && !read_only {
                    bail!(
                        "--socket-count {} would let {} guests write one image; \
                         it is allowed only with --read-only",
                        socket.socket_count,
                        socket.socket_count
                    );
                }
                Ok(ServeConfig {
                    model: Model::Blk {
                        path,
                        options: BlkOptions {
                            read_only,
                            queues,
                            queue_size,
                            io_threads: usize::from(io_threads),
                            serial,
                            latency: std::time::Duration::from_millis(test_latency_ms.unwrap_or(0)),
                            latency_slow_every: test_slow_every.unwrap_or(0),
                            test_panic: test_panic_at.map(|at| {
                                std::sync::Arc::new(PanicFault::new(at, test_panic_every))
                            }),
                        },
                    },
                    endpoints: socket.try_into()?,
                    workers: workers.map(usize::from),
                    restart: restart.try_into()?,
                    record: record.into(),
                })
            }
            Device::Rng {
                rate_limit,
                socket,
                restart,
                record,
            } => Ok(ServeConfig {
                model: Model::Rng { rate_limit },
                endpoints: socket.try_into()?,
                workers: None,
                restart: restart.try_into()?,
                record: record.into(),
            }),
        }
    }
}

impl ServeConfig {
    /// The device as a log header describes it (how replay rebuilds it),
    /// from the device opened as it will be served: a bad image or option
    /// is reported here, before any socket is touched.
    fn actor_info(&self) -> anyhow::Result<ActorInfo> {
        Ok(match &self.model {
            Model::Blk { path, options } => actor_info(
                &Blk::open(path, options).with_context(|| format!("--path {}", path.display()))?,
                "",
            ),
            Model::Rng { rate_limit } => actor_info(
                &Rng::new(*rate_limit).context("start the rate limiter")?,
                "",
            ),
        })
    }

    /// The topology entry of the device `id` on `socket`.
    fn spec(&self, id: &str, socket: PathBuf) -> DeviceSpec {
        let id = DeviceId::new(id);
        match &self.model {
            Model::Blk { path, options } => DeviceSpec::VirtioBlk(BlkSpec {
                id,
                path: path.clone(),
                read_only: options.read_only,
                serial: options.serial.clone(),
                vhost_user: VhostUserSpec {
                    restart: self.restart,
                    ..VhostUserSpec::new(socket, options.queues)
                },
            }),
            Model::Rng { rate_limit } => DeviceSpec::VirtioRng(RngSpec {
                id,
                rate_limit: *rate_limit,
                vhost_user: VhostUserSpec {
                    restart: self.restart,
                    ..VhostUserSpec::new(socket, 1)
                },
            }),
        }
    }

    /// What the topology cannot say about the device on `socket`.
    fn tuning(&self, socket: Option<BoundSocket>) -> Tuning {
        let (queue_size, io_threads, latency, latency_slow_every, test_panic) = match &self.model {
            Model::Blk { options, .. } => (
                Some(options.queue_size),
                Some(options.io_threads),
                options.latency,
                options.latency_slow_every,
                options.test_panic.clone(),
            ),
            Model::Rng { .. } => (None, None, std::time::Duration::ZERO, 0, None),
        };
        Tuning {
            serving: Serving {
                socket,
                workers: self.workers,
            },
            queue_size,
            io_threads,
            latency,
            latency_slow_every,
            test_panic,
        }
    }
}

/// Runs `switchboard serve`: one device per endpoint, named `blk0`,
/// `blk1`, ... (or `rng0`, ...) in the log and in messages.
pub(crate) fn serve(mut config: ServeConfig) -> anyhow::Result<()> {
    let info = config.actor_info()?;
    let signals = run::signals()?;
    let short = match config.model {
        Model::Blk { .. } => "blk",
        Model::Rng { .. } => "rng",
    };
    let mut devices = Vec::new();
    let mut actors = Vec::new();
    let mut tuning = BTreeMap::new();
    let mut names = BTreeMap::new();
    let endpoints = std::mem::take(&mut config.endpoints);
    for (i, endpoint) in endpoints.into_iter().enumerate() {
        let id = format!("{short}{i}");
        devices.push(config.spec(&id, endpoint.socket_path()));
        actors.push(ActorInfo {
            id: id.clone(),
            ..info.clone()
        });
        names.insert(id.clone(), endpoint.name());
        let inherited = match endpoint {
            Endpoint::Path(_) => None,
            Endpoint::Fd { fd, listener } => {
                Some(BoundSocket::inherited(listener, format!("socket fd {fd}")))
            }
        };
        tuning.insert(id, config.tuning(inherited));
    }
    let topology = Topology {
        buses: Vec::new(),
        devices,
    };
    let recorder = config.record.start(
        serde_json::to_value(&topology).context("the topology as JSON")?,
        actors,
    )?;
    run::session(Session {
        signals,
        topology,
        base_dir: PathBuf::new(),
        options: StartOptions {
            recorder: recorder.clone(),
            tuning,
            // The log holds the devices' own records and ends where the
            // process does, as it always has for `serve`.
            record_removals: false,
        },
        recorder,
        mode: Mode::Serve { names },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn config(args: &[&str]) -> anyhow::Result<ServeConfig> {
        let cli = crate::Cli::try_parse_from(["switchboard", "serve"].iter().chain(args))
            .expect("the arguments parse");
        match cli.command {
            crate::Command::Serve(device) => device.try_into(),
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn test_socket_count_on_a_writable_image_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("b.sock");
        let err = config(&[
            "blk",
            "--path",
            "disk.img",
            "--socket-count",
            "2",
            "--socket-path",
            sock.to_str().expect("utf-8"),
        ])
        .expect_err("refused");
        assert!(err.to_string().contains("--read-only"), "{err}");
    }

    #[test]
    fn test_blk_arguments_become_a_spec_and_its_tuning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("b.sock");
        let c = config(&[
            "blk",
            "--path",
            "disk.img",
            "--queues",
            "2",
            "--queue-size",
            "1024",
            "--io-threads",
            "3",
            "--workers",
            "2",
            "--serial",
            "sn",
            "--socket-path",
            sock.to_str().expect("utf-8"),
        ])
        .expect("valid");
        assert_eq!(c.endpoints.len(), 1);
        let socket = c.endpoints[0].socket_path();
        assert_eq!(socket, sock);
        match c.spec("blk0", socket) {
            DeviceSpec::VirtioBlk(b) => {
                assert_eq!(b.id.as_str(), "blk0");
                assert_eq!(b.vhost_user.queues, 2);
                assert_eq!(b.serial.as_deref(), Some("sn"));
                assert!(!b.read_only);
            }
            other => panic!("not blk: {other:?}"),
        }
        let t = c.tuning(None);
        assert_eq!(
            (t.queue_size, t.io_threads, t.serving.workers),
            (Some(1024), Some(3), Some(2))
        );
    }

    #[test]
    fn test_rng_socket_count_names_numbered_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("r.sock");
        let c = config(&[
            "rng",
            "--socket-count",
            "3",
            "--socket-path",
            base.to_str().expect("utf-8"),
        ])
        .expect("valid");
        let names: Vec<String> = c.endpoints.iter().map(Endpoint::name).collect();
        let want: Vec<String> = (0..3).map(|i| format!("{}{i}", base.display())).collect();
        assert_eq!(names, want);
        assert!(c.tuning(None).queue_size.is_none());
    }

    #[test]
    fn test_restart_flags_become_the_devices_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("r.sock");
        let sock = sock.to_str().expect("utf-8");
        let c = config(&["rng", "--socket-path", sock]).expect("valid");
        assert_eq!(c.restart, RestartPolicy::Never);
        let c = config(&[
            "rng",
            "--restart-limit",
            "3",
            "--restart-backoff-ms",
            "7000",
            "--socket-path",
            sock,
        ])
        .expect("valid");
        let want = RestartPolicy::Limited(RestartLimits {
            limit: 3,
            backoff_ms: 7000,
            max_backoff_ms: 7000,
        });
        match c.spec("rng0", PathBuf::from(sock)) {
            DeviceSpec::VirtioRng(r) => assert_eq!(r.vhost_user.restart, want),
            other => panic!("not rng: {other:?}"),
        }
        let err = config(&[
            "rng",
            "--restart-limit",
            "1",
            "--restart-backoff-ms",
            "3600001",
            "--socket-path",
            sock,
        ])
        .expect_err("too long");
        assert!(err.to_string().contains("one hour"), "{err}");
    }

    #[test]
    fn test_queue_size_must_be_a_power_of_two() {
        assert_eq!(queue_size("1024"), Ok(1024));
        assert!(queue_size("100").is_err());
        assert!(queue_size("1").is_err());
        assert!(queue_size("x").is_err());
    }
}
