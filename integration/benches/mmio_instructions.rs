// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A driver for counting the instructions of one MMIO read round trip with
//! `valgrind --tool=callgrind`, a steadier figure than the times of
//! `mmio_round_trip` on a noisy machine. It sets up what that benchmark's
//! plain-thread rows use (the bus and the zero-delay test device on their
//! own arbiter) and does `N` reads one way:
//!
//! - `actor`: sent to the bus actor by a task on the same arbiter, awaited
//!   (the `actor_bus_device` row);
//! - `vcpu`: through the bus's vCPU entry point (`BusHandle::vcpu`);
//! - `wait`: sent to the bus actor, the caller blocking on `Reply::wait`;
//! - `crossbeam`: a bounded(1) request/reply to a thread running the same
//!   device logic.
//!
//! Run it twice with two counts and divide the difference of the totals by
//! the difference of the counts, so that setup and teardown cancel out:
//!
//! ```text
//! cargo bench -p switchboard-integration --bench mmio_instructions --no-run
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/deps/mmio_instructions-* vcpu 1000
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/deps/mmio_instructions-* vcpu 11000
//! ```

use std::hint::black_box;
use std::thread;

use actix::{Arbiter, System};
use switchboard_bus::{BusHandle, RegionId};
use switchboard_devices::models::slow::{SlowDevice, SlowDeviceConfig, REG_DATA, SLOW_REGION_SIZE};
use switchboard_runtime::{
    spawn_device, AccessOp, AccessReply, AccessSize, ActorId, BusAddr, Completion, Device,
    DeviceId, DeviceRef, DeviceRegion, GuestAccess, RegionOffset, Runtime,
};

const BASE: u64 = 0xfe00_0000;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (Some(way), Some(n)) = (
        args.first(),
        args.get(1).and_then(|n| n.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: mmio_instructions actor|vcpu|wait|crossbeam COUNT");
        std::process::exit(2);
    };
    match way.as_str() {
        "crossbeam" => crossbeam(n),
        "actor" => same_arbiter(n),
        "vcpu" | "wait" => actors(way == "vcpu", n),
        other => {
            eprintln!("unknown way {other:?}: actor, vcpu, wait or crossbeam");
            std::process::exit(2);
        }
    }
}

fn data_read() -> GuestAccess {
    GuestAccess {
        region: DeviceRegion(0),
        offset: RegionOffset(REG_DATA),
        size: AccessSize::B4,
        op: AccessOp::Read,
    }
}

fn crossbeam(n: u64) {
    let (req_tx, req_rx) = crossbeam_channel::bounded::<GuestAccess>(1);
    let (rep_tx, rep_rx) = crossbeam_channel::bounded::<u64>(1);
    let server = thread::spawn(move || {
        let (mut dev, _) = SlowDevice::new(SlowDeviceConfig::default());
        for access in req_rx {
            let Completion::Ready(AccessReply::Read { value }) = dev.access(&access) else {
                unreachable!("a zero-delay read answers at once");
            };
            if rep_tx.send(value).is_err() {
                break;
            }
        }
    });
    for _ in 0..n {
        req_tx.send(data_read()).expect("server alive");
        black_box(rep_rx.recv().expect("server alive"));
    }
    drop(req_tx);
    server.join().expect("server");
}

async fn plug() -> (BusHandle, DeviceRef) {
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

fn same_arbiter(n: u64) {
    let sys = System::new();
    sys.block_on(async {
        let (bus, _dev) = plug().await;
        let me = ActorId::new("vcpu0");
        for _ in 0..n {
            let r = bus
                .read(&me, BusAddr(BASE + REG_DATA), AccessSize::B4)
                .await;
            black_box(r.expect("read"));
        }
    });
}

fn actors(vcpu: bool, n: u64) {
    let _sys = System::new();
    let arbiter = Arbiter::new();
    let (tx, rx) = crossbeam_channel::bounded(1);
    arbiter.spawn(async move {
        tx.send(plug().await).expect("driver waits");
    });
    let (bus, _dev) = rx.recv().expect("actors started");
    let me = ActorId::new("vcpu0");
    let addr = BusAddr(BASE + REG_DATA);
    let mut port = bus.vcpu(me.clone());
    for _ in 0..n {
        let r = if vcpu {
            port.read(addr, AccessSize::B4)
        } else {
            bus.read(&me, addr, AccessSize::B4).wait()
        };
        black_box(r.expect("read"));
    }
    arbiter.stop();
    arbiter.join().expect("arbiter");
}
