// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Builds a PIO bus, plugs a 16550A UART (output on stdout) and the slow test
//! device, drives accesses from several vCPU threads, unplugs the test device
//! while they run, and prints what happened.
//!
//! ```text
//! cargo run --release -p switchboard-examples --example unplug_demo
//! RUST_LOG=debug cargo run --release -p switchboard-examples --example unplug_demo -- --threads 8
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::{bail, Context as _};
use clap::Parser;
use switchboard_bus::{BusHandle, RegionId};
use switchboard_devices::models::serial::{spawn_serial, SERIAL_REGION_SIZE};
use switchboard_devices::models::slow::{
    SlowDevice, SlowDeviceConfig, REG_COUNTER, SLOW_REGION_SIZE,
};
use switchboard_devices::models::uart::regs;
use switchboard_devices::models::uart_sink::Sink;
use switchboard_runtime::{
    spawn_device, AccessReply, AccessSize, ActorId, BusAddr, DeviceId, IrqLevel, IrqLine,
    IrqNumber, Runtime, Supervisor,
};

const COM1: u64 = 0x3f8;
const SLOW_BASE: u64 = 0x1000;

/// Plug a UART and a slow test device into a bus, load it from vCPU threads,
/// and unplug the test device under load.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// vCPU threads issuing accesses.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// Accesses each thread issues.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    accesses: u64,
    /// How long each read of the test device's COUNTER register takes, in microseconds.
    #[arg(long, default_value_t = 500)]
    read_delay_us: u64,
    /// Unplug after this share of all accesses has been sent, in percent.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=100))]
    unplug_at_percent: u64,
}

/// Logs interrupt messages, as an interrupt controller would receive them.
struct Pic;

impl Actor for Pic {
    type Context = Context<Self>;
}

impl Handler<IrqLevel> for Pic {
    type Result = ();

    fn handle(&mut self, msg: IrqLevel, _: &mut Context<Self>) {
        tracing::debug!(line = msg.line.0, high = msg.high, "irq");
    }
}

#[derive(Default)]
struct Tally {
    device_reads: AtomicU64,
    unassigned_reads: AtomicU64,
    writes: AtomicU64,
    refused: AtomicU64,
}

fn vcpu(bus: BusHandle, n: u64, accesses: u64, sent: Arc<AtomicU64>, tally: Arc<Tally>) {
    let me = ActorId::new(format!("vcpu{n}"));
    let addr = BusAddr(SLOW_BASE + REG_COUNTER);
    for i in 0..accesses {
        sent.fetch_add(1, Ordering::Relaxed);
        let reply = if i % 4 == 0 {
            bus.write(&me, addr, AccessSize::B4, i).wait()
        } else {
            bus.read(&me, addr, AccessSize::B4).wait()
        };
        match reply {
            Ok(AccessReply::Read { value: 0xffff_ffff }) => &tally.unassigned_reads,
            Ok(AccessReply::Read { .. }) => &tally.device_reads,
            Ok(AccessReply::Written) => &tally.writes,
            Err(_) => &tally.refused,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

async fn say(bus: &BusHandle, me: &ActorId, text: &str) -> anyhow::Result<()> {
    // Program the UART as a driver would: 115200 8N1, FIFOs on.
    let out = |reg: u8, v: u8| {
        bus.write(
            me,
            BusAddr(COM1 + u64::from(reg)),
            AccessSize::B1,
            u64::from(v),
        )
    };
    out(regs::LCR, regs::LCR_DLAB).await?;
    out(regs::DLL, 1).await?;
    out(regs::DLM, 0).await?;
    out(regs::LCR, 0x03).await?;
    out(regs::FCR, regs::FCR_FIFO_ENABLE).await?;
    out(regs::MCR, regs::MCR_DTR | regs::MCR_RTS | regs::MCR_OUT2).await?;
    for b in text.bytes() {
        loop {
            let lsr = bus
                .read(me, BusAddr(COM1 + u64::from(regs::LSR)), AccessSize::B1)
                .await?;
            if matches!(lsr, AccessReply::Read { value } if value as u8 & regs::LSR_THRE != 0) {
                break;
            }
        }
        out(regs::THR, b).await?;
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let rt = Runtime::new();
    let supervisor = Supervisor::default().start();
    let pic = Pic.start();
    // The bus and its devices share an arbiter, so an access crosses threads
    // only between the vCPU and that arbiter.
    let machine = Arbiter::new();
    let bus = BusHandle::start(&rt, "pio0", &machine.handle());

    let com1 = spawn_serial(
        &rt,
        DeviceId::new("com1"),
        &Sink::Stdout,
        IrqLine::new(IrqNumber(4), pic.recipient()),
        &machine.handle(),
        Some(supervisor.clone().recipient()),
    )
    .context("start the UART")?
    .device;
    com1.realize_and_start().await.context("start com1")?;
    bus.add_device(
        RegionId(1),
        &com1,
        Default::default(),
        BusAddr(COM1),
        SERIAL_REGION_SIZE,
    )
    .await
    .context("plug com1")?;

    let (slow, probe) = SlowDevice::new(SlowDeviceConfig {
        read_delay: Duration::from_micros(args.read_delay_us),
        record: false,
    });
    let slow = spawn_device(
        &rt,
        DeviceId::new("slow0"),
        slow,
        &machine.handle(),
        Some(supervisor.clone().recipient()),
    )
    .device;
    slow.realize_and_start().await.context("start slow0")?;
    bus.add_device(
        RegionId(2),
        &slow,
        Default::default(),
        BusAddr(SLOW_BASE),
        SLOW_REGION_SIZE,
    )
    .await
    .context("plug slow0")?;
    println!(
        "plugged com1 ({}) at {COM1:#x} and slow0 ({}, reads take {} us) at {SLOW_BASE:#x} on bus pio0",
        switchboard_devices::models::serial::KIND,
        slow.kind(),
        args.read_delay_us
    );

    let me = ActorId::new("demo");
    say(
        &bus,
        &me,
        "hello from com1, a 16550A UART served by an actor\r\n",
    )
    .await?;

    let total = args.threads * args.accesses;
    let sent = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let vcpus: Vec<_> = (0..args.threads)
        .map(|n| {
            let (bus, sent, tally) = (bus.clone(), Arc::clone(&sent), Arc::clone(&tally));
            let accesses = args.accesses;
            thread::Builder::new()
                .name(format!("vcpu{n}"))
                .spawn(move || vcpu(bus, n, accesses, sent, tally))
        })
        .collect::<Result<_, _>>()
        .context("start vCPU threads")?;
    println!(
        "{} vCPU threads issuing {total} accesses to slow0",
        args.threads
    );

    let unplug_at = total * args.unplug_at_percent / 100;
    let mut last_report = Instant::now();
    while sent.load(Ordering::Relaxed) < unplug_at {
        actix_rt::time::sleep(Duration::from_millis(1)).await;
        if last_report.elapsed() > Duration::from_secs(1) {
            println!(
                "  ... {} of {total} accesses sent",
                sent.load(Ordering::Relaxed)
            );
            last_report = Instant::now();
        }
    }
    let pending = slow.sender().in_flight();
    println!(
        "unplugging slow0 after {} accesses were sent, {pending} in flight to it",
        sent.load(Ordering::Relaxed)
    );
    let report = bus
        .unplug(&slow, &[RegionId(2)], Some(Duration::from_secs(10)))
        .await
        .context("unplug slow0")?;
    let handled_at_drain = probe.handled();
    println!(
        "slow0 drained in {:?}: {} accesses were still being answered when the drain began; the device handled {handled_at_drain} in all",
        report.drain.waited, report.drain.answered_during_drain
    );

    while !vcpus.iter().all(|v| v.is_finished()) {
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    for v in vcpus {
        if v.join().is_err() {
            bail!("a vCPU thread panicked");
        }
    }
    let elapsed = start.elapsed();
    let stats = bus.stats().await?;
    let answered = tally.device_reads.load(Ordering::Relaxed)
        + tally.unassigned_reads.load(Ordering::Relaxed)
        + tally.writes.load(Ordering::Relaxed);
    println!(
        "done in {elapsed:?}: {answered} of {total} accesses answered; {} reads answered by slow0, {} reads unassigned (all-ones), {} writes ({} dropped as unassigned), {} refused",
        tally.device_reads.load(Ordering::Relaxed),
        tally.unassigned_reads.load(Ordering::Relaxed),
        tally.writes.load(Ordering::Relaxed),
        stats.unassigned_writes,
        tally.refused.load(Ordering::Relaxed),
    );
    println!(
        "bus pio0: {} accesses routed to devices, {} unassigned reads, {} unassigned writes, {} regions",
        stats.device_accesses, stats.unassigned_reads, stats.unassigned_writes, stats.regions
    );
    let com1_status = com1.status().await;
    if let Some(s) = com1_status {
        println!("com1: {} ({} accesses handled)", s.state, s.handled);
    }
    say(&bus, &me, "goodbye from com1\r\n").await?;

    if probe.handled() != handled_at_drain {
        bail!("an access reached slow0 after its drain completed");
    }
    if answered != total || tally.refused.load(Ordering::Relaxed) != 0 {
        bail!("{answered} of {total} accesses answered, some refused: the unplug lost accesses");
    }
    println!("OK: every access was answered exactly once; none reached slow0 after its drain");
    machine.stop();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = System::new().block_on(run(args));
    if let Err(e) = &result {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
    Ok(())
}
