// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Builds a PIO bus with a 16550A UART at 0x3f8 and drives it from several
//! plain OS threads, as a VMM's vCPU threads would after `KVM_RUN` exits on
//! an `out` to the port, through the bus's synchronous entry point
//! (`BusHandle::vcpu`). Each thread writes its lines into THR, polling
//! LSR.THRE first, under a console lock as a guest kernel's serial console
//! takes one per line. The program then prints what the UART's sink (a
//! file) received, each thread's round trip per access, and how many of its
//! accesses ran on its own thread.
//!
//! ```text
//! cargo run --release -p switchboard-examples --example vcpu_uart
//! cargo run --release -p switchboard-examples --example vcpu_uart -- --threads 8 --lines 4
//! ```

use std::path::PathBuf;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::{bail, Context as _};
use clap::Parser;
use switchboard_bus::{BusHandle, RegionId, VcpuPort, VcpuStats};
use switchboard_devices::models::serial::{spawn_serial, SERIAL_REGION_SIZE};
use switchboard_devices::models::uart::regs;
use switchboard_devices::models::uart_sink::Sink;
use switchboard_runtime::{
    AccessReply, AccessSize, ActorId, BusAddr, DeviceId, IrqLevel, IrqLine, IrqNumber, Runtime,
    Supervisor,
};

const COM1: u64 = 0x3f8;

/// Drive a 16550A UART on a PIO bus from several plain threads through the
/// bus's vCPU entry point, and print what it received.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// vCPU threads writing to the UART.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// Lines each thread writes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    lines: u64,
    /// Where the UART's output goes (a file, kept); by default a temporary
    /// file that is removed at the end.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// Counts interrupt messages, as an interrupt controller would receive them.
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

/// One vCPU's view of the UART: port I/O through its `VcpuPort`, timed.
struct Vcpu {
    port: VcpuPort,
    accesses: u64,
    busy_time: Duration,
}

impl Vcpu {
    fn inb(&mut self, reg: u8) -> anyhow::Result<u8> {
        let start = Instant::now();
        let r = self
            .port
            .read(BusAddr(COM1 + u64::from(reg)), AccessSize::B1);
        self.tick(start);
        match r {
            Ok(AccessReply::Read { value }) => Ok(value as u8),
            other => bail!("inb {reg:#x}: {other:?}"),
        }
    }

    fn outb(&mut self, reg: u8, value: u8) -> anyhow::Result<()> {
        let start = Instant::now();
        let r = self.port.write(
            BusAddr(COM1 + u64::from(reg)),
            AccessSize::B1,
            u64::from(value),
        );
        self.tick(start);
        match r {
            Ok(AccessReply::Written) => Ok(()),
            other => bail!("outb {reg:#x}: {other:?}"),
        }
    }

    fn tick(&mut self, start: Instant) {
        self.accesses += 1;
        self.busy_time += start.elapsed();
    }
}

/// What one vCPU thread did.
struct Done {
    name: String,
    accesses: u64,
    busy_time: Duration,
    stats: VcpuStats,
}

fn vcpu_thread(port: VcpuPort, lines: u64, console: &Mutex<()>) -> anyhow::Result<Done> {
    let name = port.id().to_string();
    let mut vcpu = Vcpu {
        port,
        accesses: 0,
        busy_time: Duration::ZERO,
    };
    for i in 0..lines {
        let line = format!("{name}: line {i} written through its VcpuPort\r\n");
        // One line at a time on the console, as the guest's console lock
        // would have it; a poisoned lock only means another thread failed.
        let _console = console.lock().unwrap_or_else(|e| e.into_inner());
        for b in line.bytes() {
            while vcpu.inb(regs::LSR)? & regs::LSR_THRE == 0 {}
            vcpu.outb(regs::THR, b)?;
        }
    }
    Ok(Done {
        name,
        accesses: vcpu.accesses,
        busy_time: vcpu.busy_time,
        stats: vcpu.port.stats(),
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (output, keep) = match &args.output {
        Some(p) => (p.clone(), true),
        None => (
            std::env::temp_dir().join(format!("vcpu_uart.{}.txt", std::process::id())),
            false,
        ),
    };
    // The sink appends: start from an empty file.
    std::fs::write(&output, b"").with_context(|| format!("create {}", output.display()))?;
    let rt = Runtime::new();
    let supervisor = Supervisor::default().start();
    let pic = Pic.start();
    let machine = Arbiter::new();
    let bus = BusHandle::start(&rt, "pio0", &machine.handle());
    let com1 = spawn_serial(
        &rt,
        DeviceId::new("com1"),
        &Sink::File(output.clone()),
        IrqLine::new(IrqNumber(4), pic.recipient()),
        &machine.handle(),
        Some(supervisor.recipient()),
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
    println!("plugged com1 (uart-16550) at {COM1:#x} on bus pio0");

    let ports: Vec<VcpuPort> = (0..args.threads)
        .map(|n| bus.vcpu(ActorId::new(format!("vcpu{n}"))))
        .collect();
    let lines = args.lines;
    // The vCPU threads block in their accesses; this one (the actor
    // system's) must not, so they run on a thread of their own.
    let done = thread::Builder::new()
        .name("vcpus".into())
        .spawn(move || -> anyhow::Result<Vec<Done>> {
            // Program the line (115200 8N1, FIFOs on) once, as firmware does.
            let mut setup = Vcpu {
                port: ports[0].clone(),
                accesses: 0,
                busy_time: Duration::ZERO,
            };
            setup.outb(regs::LCR, regs::LCR_DLAB)?;
            setup.outb(regs::DLL, 1)?;
            setup.outb(regs::DLM, 0)?;
            setup.outb(regs::LCR, 0x03)?;
            setup.outb(regs::FCR, regs::FCR_FIFO_ENABLE)?;
            setup.outb(regs::MCR, regs::MCR_DTR | regs::MCR_RTS | regs::MCR_OUT2)?;
            let console = Mutex::new(());
            thread::scope(|s| {
                let vcpus: Vec<_> = ports
                    .into_iter()
                    .map(|port| {
                        let console = &console;
                        s.spawn(move || vcpu_thread(port, lines, console))
                    })
                    .collect();
                vcpus
                    .into_iter()
                    .map(|v| {
                        v.join()
                            .map_err(|_| anyhow::anyhow!("a vCPU thread panicked"))?
                    })
                    .collect()
            })
        })
        .context("start the vCPU threads")?;
    while !done.is_finished() {
        actix_rt::time::sleep(Duration::from_millis(1)).await;
    }
    let done = done
        .join()
        .map_err(|_| anyhow::anyhow!("the vCPU threads panicked"))??;

    // Unplug: the drain waits for every access, and the sink is flushed.
    bus.unplug(&com1, &[RegionId(1)], Some(Duration::from_secs(5)))
        .await
        .context("unplug com1")?;
    let received =
        std::fs::read_to_string(&output).with_context(|| format!("read {}", output.display()))?;
    if !keep {
        let _ = std::fs::remove_file(&output);
    }
    println!("the UART's sink received:");
    for line in received.lines() {
        println!("  | {line}");
    }
    let mut total = VcpuStats::default();
    for d in &done {
        let per_access = d.busy_time / u32::try_from(d.accesses.max(1)).unwrap_or(u32::MAX);
        println!(
            "{}: {} accesses, {per_access:?} per round trip; {} on its own thread, {} through the bus actor (device busy), {} other",
            d.name, d.accesses, d.stats.here, d.stats.busy, d.stats.via_bus + d.stats.rerouted
        );
        total.here += d.stats.here;
        total.busy += d.stats.busy;
    }
    let expected: usize = done
        .iter()
        .map(|d| {
            (0..args.lines)
                .filter(|i| received.contains(&format!("{}: line {i} ", d.name)))
                .count()
        })
        .sum();
    if expected as u64 != args.threads * args.lines {
        bail!(
            "the sink holds {expected} of the {} lines written",
            args.threads * args.lines
        );
    }
    println!(
        "OK: all {} lines arrived whole; {} accesses ran on their vCPU thread, {} took the bus actor's path",
        args.threads * args.lines,
        total.here,
        total.busy
    );
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
