// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard replay`: a log's devices rebuilt and fed their recorded
//! messages, every answer compared with the recorded one.

use std::path::{Path, PathBuf};

use clap::Args;
use switchboard_devices::log::replay::{
    replay as replay_log, ReplayError, ReplayOptions, ReplayReport,
};
use switchboard_runtime::recording::LogError;

/// `switchboard replay LOG`.
#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
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
}

/// A log to replay, and what of it.
#[derive(Debug)]
pub(crate) struct ReplayConfig {
    log: PathBuf,
    options: ReplayOptions,
}

impl From<ReplayArgs> for ReplayConfig {
    fn from(args: ReplayArgs) -> Self {
        ReplayConfig {
            log: args.log,
            options: ReplayOptions {
                device: args.device,
                from: args.from,
                until: args.until,
                progress: !args.no_progress,
            },
        }
    }
}

/// A replay that found a divergence (exit 1); already printed.
#[derive(Debug)]
pub(crate) struct Diverged;

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the replay diverged from the recording")
    }
}

impl std::error::Error for Diverged {}

/// A log that cannot be read (exit 2).
#[derive(Debug)]
pub(crate) struct BadLog(pub(crate) String);

impl std::fmt::Display for BadLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadLog {}

fn print_replayed(r: &ReplayReport) {
    for (id, n) in &r.per_actor {
        say!("  {id}: {n} messages replayed, all matched");
    }
    for (id, (n, why)) in &r.not_replayable {
        say!("  {id}: {n} messages not replayed: {why}");
    }
    for (seq, id, reason) in &r.failures {
        say!("  {id} failed at seq {seq}: {reason}");
    }
    if r.gaps > 0 {
        say!(
            "  {} gaps in the log: {} records were dropped while recording and could not be checked",
            r.gaps, r.dropped
        );
    }
}

/// Runs `switchboard replay`.
pub(crate) fn replay(config: &ReplayConfig) -> anyhow::Result<()> {
    let log: &Path = &config.log;
    match replay_log(log, &config.options) {
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
            let truncated = matches!(error, LogError::Truncated { .. });
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
