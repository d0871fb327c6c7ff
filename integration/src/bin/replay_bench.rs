// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `replay_bench`: how fast `switchboard replay` checks a log, against how
//! fast the same log can merely be parsed as JSON (the baseline, measured
//! in the same run).
//!
//! It records a real session first: a disk and an entropy device served in
//! process, driven by the `vhost` crate's frontend (flushes, GET_IDs,
//! 16-byte entropy requests, and 4 KiB reads and writes). Then it builds
//! two logs from those records, repeated and renumbered up to `--messages`:
//! one of small messages (flush, get-id, 16-byte entropy) and one of 4 KiB
//! reads and writes. Each log is replayed `--rounds` times by the library
//! call `switchboard replay` uses; the best round counts.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use switchboard_devices::log::replay::{replay, ReplayOptions};
use switchboard_devices::models::blk::{Blk, BlkOptions};
use switchboard_devices::models::rng::Rng;
use switchboard_integration::frontend::{self, VIRTQ_DESC_F_WRITE};
use switchboard_integration::serve_in_process;
use switchboard_runtime::recording::{DataMode, Header, RecordOptions, Recorder};

/// Replay speed against JSON parsing speed.
#[derive(Debug, Parser)]
#[command(name = "replay_bench")]
struct Args {
    /// Messages in each benchmark log.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Rounds per log; the best counts.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// How bulk data is recorded: hash or value.
    #[arg(long, default_value = "hash")]
    data: String,
}

const WAIT: Duration = Duration::from_secs(10);

/// Records a session and returns the log's lines.
fn record_session(dir: &Path, mode: DataMode) -> anyhow::Result<Vec<String>> {
    let log = dir.join("session.log");
    let header = Header::new(
        "replay_bench".into(),
        mode,
        serde_json::json!({}),
        Vec::new(),
    );
    let rec = Recorder::create(
        &log,
        &header,
        RecordOptions {
            data: mode,
            ..RecordOptions::default()
        },
    )?;
    let journal: std::sync::Arc<dyn switchboard_runtime::journal::Journal> = std::sync::Arc::new(
        switchboard_runtime::journal::RecordJournal::new(rec.clone()),
    );
    let image = dir.join("disk.img");
    let f = File::create(&image)?;
    f.set_len(16 << 20)?;
    for s in 0..(16u64 << 20) / 4096 {
        f.write_all_at(&s.to_le_bytes(), s * 4096)?;
    }
    drop(f);
    let blk = serve_in_process(
        Blk::open(&image, &BlkOptions::default())?,
        1,
        dir.join("blk.sock"),
    );
    blk.server.record_to(journal.clone(), "disk0");
    let mut fe = frontend::connect(&blk.socket, 1, 64)?;
    let mut one = |kind: u32, sector: u64, data: &[u8], writable: bool| -> anyhow::Result<()> {
        fe.push_blk(0, 0, kind, sector, data, writable)?;
        fe.kick(0)?;
        fe.wait_used(0, 1, WAIT)?;
        Ok(())
    };
    for i in 0..64u64 {
        one(4, 0, &[], true)?; // flush
        one(8, 0, &[0u8; 20], true)?; // get-id
        one(0, i * 8, &[0u8; 4096], true)?; // read
        one(1, 4096 + i * 8, &[i as u8; 4096], false)?; // write
    }
    drop(fe);
    blk.finish();
    let rng = serve_in_process(Rng::new(None)?, 1, dir.join("rng.sock"));
    rng.server.record_to(journal.clone(), "rng0");
    let mut fe = frontend::connect(&rng.socket, 1, 64)?;
    for _ in 0..64 {
        fe.add_chain(0, &[(0x10_0000, 16, VIRTQ_DESC_F_WRITE)])?;
        fe.kick(0)?;
        fe.wait_used(0, 1, WAIT)?;
    }
    drop(fe);
    rng.finish();
    rec.finish()?;
    Ok(std::fs::read_to_string(&log)?
        .lines()
        .map(String::from)
        .collect())
}

fn kind_of(line: &str) -> String {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v["type"].as_str().map(String::from))
        .unwrap_or_default()
}

/// A log of the session's header and setup records, then `n` request
/// records of `kinds` repeated and renumbered.
fn build_log(path: &Path, session: &[String], kinds: &[&str], n: u64) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(File::create(path)?);
    let mut seq = 0u64;
    let mut requests = Vec::new();
    writeln!(out, "{}", session[0])?;
    for line in &session[1..] {
        let kind = kind_of(line);
        if kinds.contains(&kind.as_str()) {
            requests.push(line.clone());
        } else if kind == "added" || kind.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            seq += 1;
            writeln!(out, "{}", renumber(line, seq)?)?;
        }
    }
    if requests.is_empty() {
        bail!("the session recorded no {kinds:?} requests");
    }
    for i in 0..n {
        seq += 1;
        writeln!(
            out,
            "{}",
            renumber(&requests[i as usize % requests.len()], seq)?
        )?;
    }
    out.flush()?;
    Ok(())
}

fn renumber(line: &str, seq: u64) -> anyhow::Result<String> {
    let rest = line
        .strip_prefix("{\"seq\":")
        .and_then(|r| r.find(',').map(|i| &r[i..]))
        .context("a record starts with its seq")?;
    Ok(format!("{{\"seq\":{seq}{rest}"))
}

/// Best time of `rounds` runs of `f`.
fn best(rounds: u32, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn bench(path: &Path, n: u64, rounds: u32, what: &str) -> anyhow::Result<()> {
    let size = std::fs::metadata(path)?.len();
    // Baseline: read every line and parse it as JSON, nothing else.
    let parse = best(rounds, || {
        let text = std::fs::read_to_string(path)?;
        let mut count = 0u64;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            count += u64::from(!v.is_null());
        }
        anyhow::ensure!(count > n, "parsed {count} lines");
        Ok(())
    })?;
    let options = ReplayOptions {
        progress: false,
        ..ReplayOptions::default()
    };
    let mut replayed = 0;
    let run = best(rounds, || {
        let report = replay(path, &options).map_err(|e| anyhow::anyhow!("{e}"))?;
        replayed = report.replayed();
        Ok(())
    })?;
    anyhow::ensure!(replayed >= n, "replayed only {replayed} of {n}");
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "{what}: {n} messages, {:.0} bytes each: replay {:.0} msg/s ({:.2} s); \
         JSON parse only {:.0} msg/s ({:.2} s); replay/parse {:.2}x",
        size as f64 / n as f64,
        rate(run),
        run.as_secs_f64(),
        rate(parse),
        parse.as_secs_f64(),
        rate(run) / rate(parse)
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mode = match args.data.as_str() {
        "hash" => DataMode::Hash,
        "value" => DataMode::Value,
        other => {
            eprintln!("replay_bench: --data must be hash or value, not {other:?}");
            return ExitCode::from(2);
        }
    };
    let run = || -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let session = record_session(dir.path(), mode)?;
        let small = dir.path().join("small.log");
        build_log(
            &small,
            &session,
            &["flush", "get-id", "entropy"],
            args.messages,
        )?;
        bench(
            &small,
            args.messages,
            args.rounds,
            "small (flush, get-id, 16-byte entropy)",
        )?;
        let big = dir.path().join("4k.log");
        let n = args.messages / 4;
        build_log(&big, &session, &["read", "write"], n)?;
        bench(&big, n, args.rounds, "4 KiB reads and writes")?;
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replay_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
