// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The cost of one MMIO read round trip, six ways, in one run:
//!
//! - `direct_call`: the device logic called as a function (the floor);
//! - `crossbeam_two_threads`: a bare crossbeam-channel request/reply to a
//!   thread that runs the same device logic (the baseline the actor path is
//!   held to: within 2x);
//! - `crossbeam_two_threads_spinning`: the same, with both sides spinning
//!   instead of parking (the "two busy threads" figure of the design);
//! - `actor_bus_device`: a read sent to the bus actor, routed to the device
//!   actor, answered straight back to the caller; the caller is a task on the
//!   same arbiter, as a vCPU actor would be;
//! - `actor_bus_device_from_plain_thread`: the same read sent from a plain
//!   thread that blocks on the answer while the actors run on another
//!   arbiter: the slow path the design keeps off hot paths, shown for scale;
//! - `vcpu_port_from_plain_thread`: the same read from the same plain thread
//!   through the bus's synchronous entry point (`BusHandle::vcpu`), which
//!   runs it on the caller's thread through the device's gate.
//!
//! Run: `cargo bench -p switchboard-integration --bench mmio_round_trip`.

use std::hint::black_box;
use std::thread;
use std::time::{Duration, Instant};

use actix::{Arbiter, System};
use criterion::{criterion_group, criterion_main, Criterion};
use switchboard_bus::{BusHandle, RegionId};
use switchboard_devices::models::slow::{SlowDevice, SlowDeviceConfig, REG_DATA, SLOW_REGION_SIZE};
use switchboard_runtime::{
    spawn_device, AccessOp, AccessReply, AccessSize, ActorId, BusAddr, Completion, Device,
    DeviceId, DeviceRef, DeviceRegion, GuestAccess, RegionOffset, Runtime,
};

const BASE: u64 = 0xfe00_0000;

fn data_read() -> GuestAccess {
    GuestAccess {
        region: DeviceRegion(0),
        offset: RegionOffset(REG_DATA),
        size: AccessSize::B4,
        op: AccessOp::Read,
    }
}

fn value_of(c: Completion) -> u64 {
    match c {
        Completion::Ready(AccessReply::Read { value }) => value,
        _ => unreachable!("a zero-delay read answers at once"),
    }
}

/// A bus with the zero-delay test device at `BASE`, both on the current arbiter.
async fn plug_on_current_arbiter() -> (BusHandle, DeviceRef) {
    let rt = Runtime::new();
    let bus = BusHandle::start(&rt, "mmio", &Arbiter::current());
    let (dev, _) = SlowDevice::new(SlowDeviceConfig::default());
    let dev = spawn_device(&rt, DeviceId::new("dev"), dev, &Arbiter::current(), None).device;
    dev.realize_and_start().await.expect("start");
    bus.add_device(
        RegionId(1),
        &dev,
        DeviceRegion(0),
        BusAddr(BASE),
        SLOW_REGION_SIZE,
    )
    .await
    .expect("plug");
    (bus, dev)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("mmio_read_round_trip");
    group.measurement_time(Duration::from_secs(5));

    let (mut dev, _) = SlowDevice::new(SlowDeviceConfig::default());
    group.bench_function("direct_call", |b| {
        b.iter(|| black_box(value_of(dev.access(black_box(&data_read())))))
    });

    let (req_tx, req_rx) = crossbeam_channel::bounded::<GuestAccess>(1);
    let (rep_tx, rep_rx) = crossbeam_channel::bounded::<u64>(1);
    let server = thread::spawn(move || {
        let (mut dev, _) = SlowDevice::new(SlowDeviceConfig::default());
        for access in req_rx {
            if rep_tx.send(value_of(dev.access(&access))).is_err() {
                break;
            }
        }
    });
    group.bench_function("crossbeam_two_threads", |b| {
        b.iter(|| {
            req_tx.send(data_read()).expect("server alive");
            black_box(rep_rx.recv().expect("server alive"))
        })
    });
    drop(req_tx);
    server.join().expect("server");

    // Both threads spin instead of parking: the best a channel hop can do
    // when each side has a core to itself.
    let (req_tx, req_rx) = crossbeam_channel::bounded::<Option<GuestAccess>>(1);
    let (rep_tx, rep_rx) = crossbeam_channel::bounded::<u64>(1);
    let server = thread::spawn(move || {
        let (mut dev, _) = SlowDevice::new(SlowDeviceConfig::default());
        loop {
            match req_rx.try_recv() {
                Ok(Some(access)) => {
                    if rep_tx.send(value_of(dev.access(&access))).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(crossbeam_channel::TryRecvError::Empty) => std::hint::spin_loop(),
                Err(crossbeam_channel::TryRecvError::Disconnected) => break,
            }
        }
    });
    group.bench_function("crossbeam_two_threads_spinning", |b| {
        b.iter(|| {
            req_tx.send(Some(data_read())).expect("server alive");
            loop {
                match rep_rx.try_recv() {
                    Ok(v) => break black_box(v),
                    Err(_) => std::hint::spin_loop(),
                }
            }
        })
    });
    req_tx.send(None).expect("stop the server");
    server.join().expect("server");

    let sys = System::new();
    let me = ActorId::new("vcpu0");
    let (bus, _dev) = sys.block_on(plug_on_current_arbiter());
    let addr = BusAddr(BASE + REG_DATA);
    group.bench_function("actor_bus_device", |b| {
        b.iter_custom(|iters| {
            sys.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let r = bus.read(&me, addr, AccessSize::B4).await;
                    black_box(r.expect("read"));
                }
                start.elapsed()
            })
        })
    });

    // The actors on their own arbiter thread; the caller blocks.
    let arbiter = Arbiter::new();
    let (tx, rx) = crossbeam_channel::bounded(1);
    arbiter.spawn(async move {
        tx.send(plug_on_current_arbiter().await)
            .expect("bench waits");
    });
    let (remote_bus, _remote_dev) = rx.recv().expect("actors started");
    group.bench_function("actor_bus_device_from_plain_thread", |b| {
        b.iter(|| {
            black_box(
                remote_bus
                    .read(&me, addr, AccessSize::B4)
                    .wait()
                    .expect("read"),
            )
        })
    });
    let mut port = remote_bus.vcpu(me.clone());
    group.bench_function("vcpu_port_from_plain_thread", |b| {
        b.iter(|| black_box(port.read(addr, AccessSize::B4).expect("read")))
    });
    let stats = port.stats();
    assert_eq!(
        (stats.busy, stats.via_bus, stats.rerouted),
        (0, 0, 0),
        "every read answered on the caller's thread: {stats:?}"
    );
    group.finish();
    arbiter.stop();
}

criterion_group!(benches, bench);
criterion_main!(benches);
