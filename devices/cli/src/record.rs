// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `--record` and its options, shared by `serve` and `run`: the log's
//! header and its end.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Args;
use switchboard_runtime::recording::{
    ActorInfo, Compress, DataMode, Header, LogFormat, RecordOptions, Recorder, Until, WhenFull,
    DEFAULT_BUFFER,
};

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

/// The form of a log.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RecordFormat {
    /// JSON Lines (version 1).
    Json,
    /// Binary frames with a CRC32C each (version 4, runtime/LOG-FORMAT.md):
    /// cheaper to write and to replay, and smaller.
    Binary,
}

/// `--record LOG` and the options that say how.
#[derive(Debug, Args)]
pub(crate) struct RecordArgs {
    /// Record every message each device receives, with its reply and the
    /// data it read, to LOG (binary by default, see --record-format and
    /// the README). LOG must not exist.
    #[arg(long, value_name = "LOG")]
    record: Option<PathBuf>,
    /// How bulk data (guest memory, file contents, entropy) is recorded.
    #[arg(long, value_enum, default_value_t = RecordData::Hash, value_name = "MODE")]
    record_data: RecordData,
    /// When the log's buffer is full: wait, or drop and mark a gap.
    #[arg(long, value_enum, default_value_t = RecordFull::Wait, value_name = "WHAT")]
    record_full: RecordFull,
    /// Records each recording thread's buffer holds before it is full (a
    /// buffer is also full at 16 MiB, whichever comes first); see
    /// --record-full.
    #[arg(long, default_value_t = DEFAULT_BUFFER as u64, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    record_buffer: u64,
    /// The log's form. `switchboard log --json` shows either as JSON Lines.
    #[arg(long, value_enum, default_value_t = RecordFormat::Binary, value_name = "FORM")]
    record_format: RecordFormat,
    /// Compress bulk data held by value (--record-data value) with zstd
    /// in the binary form, where that makes it shorter. It costs CPU on
    /// the device's threads (BENCHMARKS.md); hashed data is not affected.
    #[arg(long, value_enum, default_value_t = RecordCompress::None, value_name = "HOW")]
    record_compress: RecordCompress,
    /// Test only: drop each record given to the recorder after STAGE
    /// instead of writing it, to measure where recording's cost goes
    /// (integration/qemu/record-stages.sh). The log then lacks those
    /// records: it is not a recording of the run.
    #[arg(
        long,
        value_enum,
        value_name = "STAGE",
        requires = "record",
        hide = true
    )]
    test_record_until: Option<RecordUntil>,
}

/// `--test-record-until`: the stage after which a record is dropped.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RecordUntil {
    /// Before it is built: a virtio request's data is hashed, once per
    /// block, and nothing else is made of it.
    Hash,
    /// As it reaches the recorder: the device built it (its data hashed
    /// or copied), nothing more.
    Capture,
    /// Once encoded into a buffer of the recording thread's own.
    Encode,
    /// Once in the recording thread's buffer with its seq: the log writer
    /// takes it and drops it.
    Slot,
}

/// `--record-compress`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RecordCompress {
    /// Bulk data as it is.
    None,
    /// zstd, level 1, block by block.
    Zstd,
}

/// Where a log goes and how it is written; no log without `--record`.
#[derive(Debug)]
pub(crate) struct Recording {
    path: Option<PathBuf>,
    options: RecordOptions,
}

impl From<RecordArgs> for Recording {
    fn from(args: RecordArgs) -> Self {
        let data = match args.record_data {
            RecordData::Hash => DataMode::Hash,
            RecordData::Value => DataMode::Value,
        };
        Recording {
            path: args.record,
            options: RecordOptions {
                data,
                // At most 16 Mi, by the argument's range.
                buffer: args.record_buffer as usize,
                when_full: match args.record_full {
                    RecordFull::Wait => WhenFull::Wait,
                    RecordFull::Gap => WhenFull::Gap,
                },
                format: match args.record_format {
                    RecordFormat::Json => LogFormat::JsonLines,
                    RecordFormat::Binary => LogFormat::Binary,
                },
                compress: match args.record_compress {
                    RecordCompress::None => Compress::None,
                    RecordCompress::Zstd => Compress::Zstd,
                },
                until: match args.test_record_until {
                    None => Until::Whole,
                    Some(RecordUntil::Hash) => Until::Hash,
                    Some(RecordUntil::Capture) => Until::Capture,
                    Some(RecordUntil::Encode) => Until::Encode,
                    Some(RecordUntil::Slot) => Until::Slot,
                },
            },
        }
    }
}

impl Recording {
    /// Creates the log with its header (the topology started and its
    /// actors), if `--record` was given. An existing file is never
    /// overwritten.
    pub(crate) fn start(
        &self,
        topology: serde_json::Value,
        actors: Vec<ActorInfo>,
    ) -> anyhow::Result<Option<Recorder>> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        if self.options.compress == Compress::Zstd && self.options.format == LogFormat::JsonLines {
            bail!(
                "--record-compress zstd: only the binary form compresses; drop --record-format json"
            );
        }
        if path.exists() {
            bail!(
                "--record {}: the file exists; remove it or choose another path (a log is never overwritten)",
                path.display()
            );
        }
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let header = Header::new(command, self.options.data, topology, actors);
        let recorder = Recorder::create(path, &header, self.options)
            .with_context(|| format!("--record {}", path.display()))?;
        eprintln!(
            "switchboard: recording to {} ({} data)",
            path.display(),
            match self.options.data {
                DataMode::Hash => "hashed",
                DataMode::Value => "by-value",
            }
        );
        Ok(Some(recorder))
    }
}

/// Closes a log and says what it holds.
pub(crate) fn finish(recorder: Option<Recorder>) -> anyhow::Result<()> {
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
