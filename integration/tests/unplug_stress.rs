// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Unplug under load: four plain threads hammer the slow test device through
//! the bus while it is unplugged in the middle, 200 times over.
//!
//! What a VMM author relies on, asserted every round:
//! - every access gets exactly one answer, and none is an error: an access the
//!   bus routed before the removal is answered by the device, one routed after
//!   gets the unassigned behaviour;
//! - every write the device accepted is one the threads sent, exactly once;
//!   device writes plus unassigned writes account for every write;
//! - every access sent after the bus answered the removal is unassigned
//!   (reads all-ones, writes dropped and counted);
//! - once a thread has seen the unassigned behaviour, it never reaches the
//!   device again;
//! - the drain reply comes after every accepted access was answered, and
//!   nothing reaches the device after it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use actix::Arbiter;
use switchboard_bus::{BusHandle, RegionId};
use switchboard_devices::models::slow::{
    SlowDevice, SlowDeviceConfig, COUNTER_TAG, REG_COUNTER, REG_DATA, SLOW_REGION_SIZE,
};
use switchboard_runtime::{
    spawn_device, AccessOp, AccessReply, AccessSize, ActorId, BusAddr, DeviceId, Reply, Runtime,
};

const ROUNDS: usize = 200;
const THREADS: u64 = 4;
const PER_THREAD: u64 = 160;
/// Accesses a thread keeps outstanding before waiting for their answers.
const WINDOW: usize = 8;
const BASE: u64 = 0x1000;

/// One access as a worker thread saw it.
struct Issued {
    /// Global order in which it was sent, across all threads.
    ticket: u64,
    op: AccessOp,
    reply: AccessReply,
}

fn op_for(thread: u64, i: u64) -> (u64, AccessOp) {
    match i % 3 {
        0 => (
            REG_DATA,
            AccessOp::Write {
                value: (thread << 32) | i,
            },
        ),
        1 => (REG_COUNTER, AccessOp::Read),
        _ => (REG_DATA, AccessOp::Read),
    }
}

fn worker(bus: BusHandle, thread: u64, tickets: Arc<AtomicU64>) -> Vec<Issued> {
    let me = ActorId::new(format!("vcpu{thread}"));
    let mut out = Vec::with_capacity(PER_THREAD as usize);
    let mut window: Vec<(u64, AccessOp, Reply<AccessReply>)> = Vec::with_capacity(WINDOW);
    let mut i = 0;
    while i < PER_THREAD {
        while window.len() < WINDOW && i < PER_THREAD {
            let (reg, op) = op_for(thread, i);
            let ticket = tickets.fetch_add(1, Ordering::SeqCst);
            let reply = match op {
                AccessOp::Read => bus.read(&me, BusAddr(BASE + reg), AccessSize::B8),
                AccessOp::Write { value } => {
                    bus.write(&me, BusAddr(BASE + reg), AccessSize::B8, value)
                }
            };
            window.push((ticket, op, reply));
            i += 1;
        }
        for (ticket, op, reply) in window.drain(..) {
            let reply = match reply.wait() {
                Ok(r) => r,
                Err(refused) => panic!("thread {thread}: access {ticket} refused: {refused}"),
            };
            out.push(Issued { ticket, op, reply });
        }
    }
    out
}

struct RoundOutcome {
    accesses: u64,
    pending_at_drain: u64,
}

async fn round(rep: usize) -> RoundOutcome {
    let rt = Runtime::new();
    let here = Arbiter::current();
    let bus = BusHandle::start(&rt, "pio", &here);
    let (dev, probe) = SlowDevice::new(SlowDeviceConfig {
        read_delay: Duration::from_millis(2),
        record: true,
    });
    let dev = spawn_device(&rt, DeviceId::new("slow"), dev, &here, None).device;
    dev.realize_and_start().await.expect("start");
    let region = RegionId(1);
    bus.add_device(
        region,
        &dev,
        Default::default(),
        BusAddr(BASE),
        SLOW_REGION_SIZE,
    )
    .await
    .expect("plug");

    let tickets = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let bus = bus.clone();
            let tickets = Arc::clone(&tickets);
            thread::spawn(move || worker(bus, t, tickets))
        })
        .collect();

    // Unplug once about half of the accesses have been sent.
    let half = THREADS * PER_THREAD / 2 + (rep as u64 % 7) * 10;
    while tickets.load(Ordering::SeqCst) < half {
        actix_rt::time::sleep(Duration::from_micros(200)).await;
    }
    bus.remove_region(region).await.expect("remove");
    let removed_at_ticket = tickets.load(Ordering::SeqCst);
    let handled_at_removal = probe.handled();
    let drain = dev
        .drain(Some(Duration::from_secs(30)))
        .await
        .expect("drain");
    let handled_at_drain = probe.handled();
    assert_eq!(
        dev.sender().in_flight(),
        0,
        "drain replied with accesses in flight"
    );
    assert!(
        probe.stopped(),
        "device state still alive after the drain reply"
    );

    // The workers' last accesses are answered on this thread: wait without
    // blocking it.
    while !workers.iter().all(|w| w.is_finished()) {
        actix_rt::time::sleep(Duration::from_micros(500)).await;
    }
    let results: Vec<Vec<Issued>> = workers
        .into_iter()
        .map(|w| w.join().expect("worker panicked"))
        .collect();
    assert_eq!(
        probe.handled(),
        handled_at_drain,
        "an access reached the device after the drain reply"
    );
    assert!(handled_at_removal <= handled_at_drain);

    let seen = probe.seen();
    let stats = bus.stats().await.expect("stats");
    let mut device_write_tags = HashSet::new();
    let mut device_reads = 0u64;
    for s in &seen {
        match s.access.op {
            AccessOp::Write { value } => {
                assert!(
                    device_write_tags.insert(value),
                    "write {value:#x} reached the device twice"
                );
            }
            AccessOp::Read => device_reads += 1,
        }
    }

    let mut writes = 0u64;
    let mut sent_writes = HashSet::new();
    let mut answered_by_device_reads = 0u64;
    let mut accesses = 0u64;
    for (thread, issued) in results.iter().enumerate() {
        assert_eq!(
            issued.len() as u64,
            PER_THREAD,
            "thread {thread}: lost answers"
        );
        let mut unassigned_seen = false;
        for a in issued {
            accesses += 1;
            match (a.op, a.reply) {
                (AccessOp::Read, AccessReply::Read { value }) => {
                    if value == u64::MAX {
                        unassigned_seen = true;
                    } else {
                        assert!(
                            !unassigned_seen,
                            "thread {thread}: reached the device after the removal"
                        );
                        assert!(
                            a.ticket < removed_at_ticket,
                            "access {} sent after the removal reply reached the device",
                            a.ticket
                        );
                        assert!(
                            value & COUNTER_TAG == COUNTER_TAG || (value >> 32) < THREADS,
                            "unexpected read value {value:#x}"
                        );
                        answered_by_device_reads += 1;
                    }
                }
                (AccessOp::Write { value }, AccessReply::Written) => {
                    writes += 1;
                    sent_writes.insert(value);
                    if a.ticket >= removed_at_ticket {
                        assert!(
                            !device_write_tags.contains(&value),
                            "write {} sent after the removal reply reached the device",
                            a.ticket
                        );
                    }
                }
                (op, reply) => panic!("mismatched reply {reply:?} to {op:?}"),
            }
        }
    }
    assert!(
        device_write_tags.is_subset(&sent_writes),
        "the device saw a write nobody sent"
    );
    assert_eq!(
        answered_by_device_reads, device_reads,
        "device reads answered != device reads accepted"
    );
    assert_eq!(
        device_write_tags.len() as u64 + stats.unassigned_writes,
        writes,
        "writes unaccounted for"
    );
    assert_eq!(
        device_reads + stats.unassigned_reads,
        accesses - writes,
        "reads unaccounted for"
    );
    assert_eq!(
        seen.len() as u64 + stats.unassigned_reads + stats.unassigned_writes,
        accesses
    );
    RoundOutcome {
        accesses,
        pending_at_drain: drain.answered_during_drain,
    }
}

#[test]
fn test_unplug_under_load_answers_every_accepted_access_exactly_once() {
    let start = Instant::now();
    let (total, rounds_with_pending) = actix::System::new().block_on(async {
        let mut total = 0u64;
        let mut with_pending = 0usize;
        for rep in 0..ROUNDS {
            let out = round(rep).await;
            total += out.accesses;
            with_pending += usize::from(out.pending_at_drain > 0);
        }
        (total, with_pending)
    });
    eprintln!(
        "{ROUNDS} rounds, {total} accesses, {rounds_with_pending} rounds drained with accesses pending, {:?}",
        start.elapsed()
    );
    assert!(total >= 100_000, "only {total} accesses");
    // The drain path, not just the empty-device shortcut, must be exercised.
    assert!(
        rounds_with_pending >= ROUNDS / 2,
        "only {rounds_with_pending} of {ROUNDS} rounds had accesses pending at the drain"
    );
}
