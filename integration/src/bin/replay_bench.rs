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
//! reads and writes. Each log is also converted to the binary form
//! (`switchboard log --convert`), and the two forms of each are replayed
//! in alternating rounds (`--rounds`, the order swapped every round) by the
//! library call `switchboard replay` uses; the medians count. `--keep DIR`
//! leaves the four logs in DIR (for `valgrind --tool=callgrind switchboard
//! replay LOG`).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use switchboard_devices::log::convert::convert;
use switchboard_devices::log::replay::{replay, ReplayOptions};
use switchboard_devices::models::blk::{Blk, BlkOptions};
use switchboard_devices::models::rng::Rng;
use switchboard_integration::frontend::{self, VIRTQ_DESC_F_WRITE};
use switchboard_integration::serve_in_process;
use switchboard_runtime::recording::{DataMode, Header, LogFormat, RecordOptions, Recorder};

/// Replay speed against JSON parsing speed.
#[derive(Debug, Parser)]
#[command(name = "replay_bench")]
struct Args {
    /// Messages in each benchmark log.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Rounds per log, alternating the forms; the medians count.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Write the logs into this directory (which must exist) and keep them.
    #[arg(long, value_name = "DIR")]
    keep: Option<std::path::PathBuf>,
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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn replay_once(path: &Path, n: u64) -> anyhow::Result<Duration> {
    let options = ReplayOptions {
        progress: false,
        ..ReplayOptions::default()
    };
    let t = Instant::now();
    let report = replay(path, &options).map_err(|e| anyhow::anyhow!("{e}"))?;
    let took = t.elapsed();
    anyhow::ensure!(
        report.replayed() >= n,
        "{}: replayed only {} of {n}",
        path.display(),
        report.replayed()
    );
    Ok(took)
}

/// Replays `json` and its binary form `bin` in alternating rounds, and
/// parses `json` as a baseline; prints the medians.
fn bench(json: &Path, bin: &Path, n: u64, rounds: u32, what: &str) -> anyhow::Result<()> {
    let (mut tj, mut tb, mut tp) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        if round % 2 == 0 {
            tj.push(replay_once(json, n)?);
            tb.push(replay_once(bin, n)?);
        } else {
            tb.push(replay_once(bin, n)?);
            tj.push(replay_once(json, n)?);
        }
        // Baseline: read every line and parse it as JSON, nothing else.
        let t = Instant::now();
        let text = std::fs::read_to_string(json)?;
        let mut count = 0u64;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            count += u64::from(!v.is_null());
        }
        anyhow::ensure!(count > n, "parsed {count} lines");
        tp.push(t.elapsed());
    }
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let per =
        |p: &Path| -> anyhow::Result<f64> { Ok(std::fs::metadata(p)?.len() as f64 / n as f64) };
    let (j, b, p) = (median(tj), median(tb), median(tp));
    println!("{what}: {n} messages, median of {rounds} alternating rounds");
    println!(
        "  JSON Lines: replay {:.0} msg/s ({:.2} s), {:.0} bytes each",
        rate(j),
        j.as_secs_f64(),
        per(json)?
    );
    println!(
        "  binary:     replay {:.0} msg/s ({:.2} s), {:.0} bytes each; binary/JSON {:.2}x",
        rate(b),
        b.as_secs_f64(),
        per(bin)?,
        rate(b) / rate(j)
    );
    println!(
        "  JSON parse only (baseline): {:.0} msg/s ({:.2} s)",
        rate(p),
        p.as_secs_f64()
    );
    Ok(())
}

/// Builds the JSON Lines log at `json` and converts it to `bin`.
fn build_both(
    json: &Path,
    bin: &Path,
    session: &[String],
    kinds: &[&str],
    n: u64,
) -> anyhow::Result<()> {
    for p in [json, bin] {
        if p.exists() {
            std::fs::remove_file(p)?;
        }
    }
    build_log(json, session, kinds, n)?;
    convert(json, bin, LogFormat::Binary).map_err(|e| anyhow::anyhow!("{e}"))?;
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
        if let Some(keep) = &args.keep {
            anyhow::ensure!(
                keep.is_dir(),
                "--keep {}: not a directory (it must exist)",
                keep.display()
            );
        }
        let tmp = tempfile::tempdir()?;
        let dir = args
            .keep
            .clone()
            .unwrap_or_else(|| tmp.path().to_path_buf());
        let session = record_session(tmp.path(), mode)?;
        let (small, small_bin) = (dir.join("small.log"), dir.join("small.bin"));
        let kinds = ["flush", "get-id", "entropy"];
        build_both(&small, &small_bin, &session, &kinds, args.messages)?;
        bench(
            &small,
            &small_bin,
            args.messages,
            args.rounds,
            "small (flush, get-id, 16-byte entropy)",
        )?;
        let (big, big_bin) = (dir.join("4k.log"), dir.join("4k.bin"));
        let n = args.messages / 4;
        build_both(&big, &big_bin, &session, &["read", "write"], n)?;
        bench(&big, &big_bin, n, args.rounds, "4 KiB reads and writes")?;
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
