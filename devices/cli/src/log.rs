// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard log`: a log's records, filtered, or statistics about them.

use std::path::PathBuf;

use clap::Args;
use switchboard_devices::log::inspect::{inspect, InspectOptions};

use crate::replay::BadLog;

/// `switchboard log LOG`.
#[derive(Debug, Args)]
pub(crate) struct LogArgs {
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
}

/// A log to print, and what of it.
#[derive(Debug)]
pub(crate) struct LogConfig {
    log: PathBuf,
    options: InspectOptions,
}

impl From<LogArgs> for LogConfig {
    fn from(args: LogArgs) -> Self {
        LogConfig {
            log: args.log,
            options: InspectOptions {
                device: args.device,
                kind: args.kind,
                from: args.from,
                until: args.until,
                stats: args.stats,
                json: args.json,
            },
        }
    }
}

/// Runs `switchboard log`.
pub(crate) fn show(config: &LogConfig) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = inspect(&config.log, &config.options, &mut out);
    let _ = std::io::Write::flush(&mut out);
    match result {
        Ok(_) => Ok(()),
        // `switchboard log LOG | head`: the reader left; stop quietly.
        Err(e) if e.is_closed_output() => Ok(()),
        Err(e) => Err(BadLog(e.to_string()).into()),
    }
}
