// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard run`, and the session `serve` shares with it: start a
//! checked topology with the library's runner, report each device, wait
//! for SIGINT or SIGTERM, drain and stop everything, close the log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use signal_hook::iterator::Signals;
use switchboard_devices::host::control::ControlServer;
use switchboard_devices::host::runner::{log_actors, Runner, StartOptions};
use switchboard_devices::host::topology::Topology;
use switchboard_devices::vhost_user::check_socket_path;
use switchboard_runtime::recording::Recorder;

use crate::record::{self, RecordArgs, Recording};

/// `switchboard run FILE`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
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

/// What `switchboard run` was asked to do.
#[derive(Debug)]
pub(crate) struct RunConfig {
    file: PathBuf,
    control: Option<PathBuf>,
    strict: bool,
    create_images: Option<u64>,
    record: Recording,
}

impl From<RunArgs> for RunConfig {
    fn from(args: RunArgs) -> Self {
        RunConfig {
            file: args.file,
            control: args.control,
            strict: args.strict,
            create_images: args.create_images,
            record: args.record.into(),
        }
    }
}

/// Listens for SIGINT and SIGTERM. Installed before any device starts, so
/// that a signal that arrives while devices start is not lost.
pub(crate) fn signals() -> anyhow::Result<Signals> {
    Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context("install signal handlers")
}

/// Creates the missing virtio-blk images of `file` as sparse files.
fn create_images(file: &Path, size: u64) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    // An unparsable file is left for the check to report.
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(());
    };
    let base = file.parent().unwrap_or(Path::new(""));
    let devices = value["devices"].as_array().cloned().unwrap_or_default();
    for d in devices {
        if d["kind"] != switchboard_devices::models::blk::KIND {
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

/// Runs `switchboard run`.
pub(crate) fn run(config: RunConfig) -> anyhow::Result<()> {
    let signals = signals()?;
    let file = &config.file;
    if let Some(size) = config.create_images {
        create_images(file, size)?;
    }
    let topology = crate::check::checked(file)?;
    if let Some(c) = &config.control {
        check_socket_path(c).with_context(|| format!("--control {}", c.display()))?;
    }
    let recorder = config.record.start(
        serde_json::to_value(&topology).context("the topology as JSON")?,
        log_actors(&topology),
    )?;
    session(Session {
        signals,
        topology,
        base_dir: file.parent().unwrap_or(Path::new("")).to_path_buf(),
        options: StartOptions {
            recorder: recorder.clone(),
            ..StartOptions::default()
        },
        recorder,
        mode: Mode::Run {
            control: config.control,
            strict: config.strict,
        },
    })
}

/// What a session says and when it ends: `run`'s summaries on stdout, or
/// `serve`'s one line per device on stderr.
#[derive(Debug)]
pub(crate) enum Mode {
    /// `switchboard run`: a line per device and a summary (with the QEMU
    /// command) on stdout; a device that fails to start is reported and
    /// the others run, unless `strict`; a control socket if asked for.
    /// Ends on a signal.
    Run {
        control: Option<PathBuf>,
        strict: bool,
    },
    /// `switchboard serve`: `serving KIND on SOCKET` per device on stderr,
    /// where `names` (by device id) gives SOCKET; every device must start.
    /// Ends on a signal, or once every device has stopped by itself.
    Serve { names: BTreeMap<String, String> },
}

/// A checked topology to run until stopped.
pub(crate) struct Session {
    /// Installed before anything started ([`signals`]).
    pub(crate) signals: Signals,
    pub(crate) topology: Topology,
    /// Where a device-add's relative paths are taken from.
    pub(crate) base_dir: PathBuf,
    /// With a clone of `recorder`.
    pub(crate) options: StartOptions,
    /// The log, closed at the end.
    pub(crate) recorder: Option<Recorder>,
    pub(crate) mode: Mode,
}

/// How often a `serve` session looks for a signal or for its devices all
/// having stopped.
const SERVE_POLL: Duration = Duration::from_millis(20);

/// Starts the session's devices, reports them, waits for the end, then
/// drains and stops every device and closes the log. Fails if a device
/// did not start (`serve`, or `run --strict`) or did not stop cleanly.
pub(crate) fn session(session: Session) -> anyhow::Result<()> {
    let Session {
        mut signals,
        topology,
        base_dir,
        options,
        recorder,
        mode,
    } = session;
    let t0 = Instant::now();
    let (runner, started) =
        Runner::start_with(topology, &base_dir, options).context("start the runtime")?;
    let elapsed = t0.elapsed();
    let runner = Arc::new(runner);
    let failed: Vec<&str> = started
        .iter()
        .filter_map(|s| s.result.as_ref().err().map(String::as_str))
        .collect();
    let (control, strict) = match &mode {
        Mode::Run { control, strict } => (control.as_deref(), *strict),
        Mode::Serve { .. } => (None, true),
    };
    if let Mode::Run { .. } = mode {
        for s in &started {
            match &s.result {
                Ok(what) => say!("{}: {what}", s.id),
                Err(why) => eprintln!("{}: FAILED: {why}", s.id),
            }
        }
    }
    if !failed.is_empty() && strict {
        let why = match &mode {
            Mode::Run { .. } => format!(
                "{} of {} devices did not start (--strict)",
                failed.len(),
                started.len()
            ),
            Mode::Serve { .. } => failed.join("; "),
        };
        runner.shutdown();
        record::finish(recorder)?;
        bail!(why);
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
    match &mode {
        Mode::Run { .. } => {
            say!(
                "switchboard: {} of {} devices running (started in {} ms){}; SIGINT or SIGTERM stops",
                started.len() - failed.len(),
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
        }
        Mode::Serve { names } => {
            for d in runner.fleet().query() {
                let at = names.get(&d.id).cloned().unwrap_or(d.at);
                eprintln!("switchboard: serving {} on {at}", d.kind);
            }
            // A device whose serving ended (it failed) stays stopped:
            // with none left, the process ends and its supervisor can
            // restart it.
            loop {
                if let Some(sig) = signals.pending().next() {
                    eprintln!("switchboard: signal {sig}: draining and stopping");
                    break;
                }
                if runner.all_stopped() {
                    break;
                }
                std::thread::sleep(SERVE_POLL);
            }
        }
    }
    let t1 = Instant::now();
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
    if let Mode::Run { .. } = mode {
        eprintln!(
            "switchboard: stopped {} devices in {} ms",
            results.len(),
            t1.elapsed().as_millis()
        );
    }
    record::finish(recorder)?;
    if errors > 0 {
        bail!("{errors} devices did not stop cleanly");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_size_takes_suffixes_and_refuses_less_than_a_sector() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("100").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
