// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard log`: a log's records, filtered, or statistics about them;
//! or the log written again in the other form (`--convert`).

use std::path::PathBuf;

use clap::Args;
use switchboard_devices::log::convert::{convert, other, ConvertError};
use switchboard_devices::log::inspect::{inspect, InspectOptions};
use switchboard_runtime::recording::LogFormat;

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
    /// Write the whole log, record for record, to OUT in the other form
    /// (or the one --to names) instead of printing it. OUT must not
    /// exist. A damaged log is converted up to the damage, then exits 2.
    #[arg(long, value_name = "OUT", conflicts_with_all = ["device", "kind", "from", "until", "stats", "json"])]
    convert: Option<PathBuf>,
    /// The form --convert writes: json (JSON Lines, version 1) or binary
    /// (version 4). Default: the other form than the log's.
    #[arg(long, value_enum, value_name = "FORM", requires = "convert")]
    to: Option<Form>,
}

/// A log's form, for `--to`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Form {
    /// JSON Lines (version 1).
    Json,
    /// Binary frames (version 4, runtime/LOG-FORMAT.md).
    Binary,
}

/// Where `--convert` writes, and in which form (`None`: the other one).
#[derive(Debug)]
struct ConvertTo {
    out: PathBuf,
    to: Option<LogFormat>,
}

/// A log to print, and what of it.
#[derive(Debug)]
pub(crate) struct LogConfig {
    log: PathBuf,
    options: InspectOptions,
    convert: Option<ConvertTo>,
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
            convert: args.convert.map(|out| ConvertTo {
                out,
                to: args.to.map(|f| match f {
                    Form::Json => LogFormat::JsonLines,
                    Form::Binary => LogFormat::Binary,
                }),
            }),
        }
    }
}

/// Runs `switchboard log`.
pub(crate) fn show(config: &LogConfig) -> anyhow::Result<()> {
    if let Some(c) = &config.convert {
        return convert_log(config, c);
    }
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

fn form(f: LogFormat) -> &'static str {
    match f {
        LogFormat::JsonLines => "JSON Lines",
        LogFormat::Binary => "binary",
    }
}

/// Runs `switchboard log LOG --convert OUT`.
fn convert_log(config: &LogConfig, c: &ConvertTo) -> anyhow::Result<()> {
    let to = match c.to {
        Some(to) => to,
        None => {
            // The other form than the log's: peek at it first.
            let reader =
                switchboard_devices::log::open(&config.log).map_err(|e| BadLog(e.to_string()))?;
            other(if reader.is_binary() {
                LogFormat::Binary
            } else {
                LogFormat::JsonLines
            })
        }
    };
    let said = |s: &switchboard_devices::log::convert::ConvertSummary, what: &str| {
        say!(
            "{}: {what}{} records converted from {} to {} ({} bytes)",
            c.out.display(),
            s.records,
            form(s.from),
            form(s.to),
            s.bytes
        );
    };
    match convert(&config.log, &c.out, to) {
        Ok(s) => {
            said(&s, "");
            Ok(())
        }
        Err(ConvertError::Damaged { error, written }) => {
            said(&written, "the ");
            say!("{}: the log is damaged after them", config.log.display());
            Err(BadLog(error.to_string()).into())
        }
        Err(ConvertError::OpenLog(e)) => Err(BadLog(e.to_string()).into()),
        Err(e @ ConvertError::CreateOutput { .. }) => Err(anyhow::Error::new(e)
            .context("--convert: the output must not exist (a log is never overwritten)")),
        Err(e) => Err(e.into()),
    }
}
