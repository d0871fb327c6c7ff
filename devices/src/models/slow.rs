// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A test device whose register reads take a configurable time to answer.
//!
//! Used to test drain-on-unplug: a read is accepted at once and answered
//! `read_delay` later, so an unplug issued meanwhile has accesses in flight.
//!
//! Registers (one region, [`SLOW_REGION_SIZE`] bytes):
//!
//! | offset | read | write |
//! | --- | --- | --- |
//! | `0x00` ID | `0x534c_4f57` ("SLOW") | ignored |
//! | `0x08` DATA | the last value written | stores the value |
//! | `0x10` COUNTER | `0x5100_0000` + reads so far (24 bits) | ignored |
//!
//! Every read takes `read_delay`; writes are answered at once. A read takes
//! its value when it is answered, not when it arrives: the registers change
//! in the order the device's replies are sent, which is the order a message
//! log records them in, so a log replays whatever the delay reordered (a
//! write answered while an earlier read waits). The delay decides only when
//! replies go, never what they say: [`SlowDevice::replay`] rebuilds the
//! device from [`SlowDeviceRebuild`] and answers at once. A
//! [`SlowDeviceProbe`] shows a test everything that reached the device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard_runtime::{AccessOp, AccessReply, Completion, Device, GuestAccess};

/// Size of the device's register region.
pub const SLOW_REGION_SIZE: u64 = 0x20;

/// The device kind, as in a topology file and in logs.
pub const KIND: &str = "test-device";
/// ID register.
pub const REG_ID: u64 = 0x00;
/// Data register.
pub const REG_DATA: u64 = 0x08;
/// Counter register.
pub const REG_COUNTER: u64 = 0x10;
/// The value of the ID register.
pub const SLOW_ID: u64 = 0x534c_4f57;
/// High bits of every COUNTER read, so a counter read is never all-ones.
pub const COUNTER_TAG: u64 = 0x5100_0000;

/// Configuration of a [`SlowDevice`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowDeviceConfig {
    /// How long each read takes to answer.
    pub read_delay: Duration,
    /// Whether the probe keeps every access ([`SlowDeviceProbe::seen`]);
    /// off, it only counts them.
    pub record: bool,
}

/// What replay needs to rebuild a [`SlowDevice`] (its `added` record and
/// the log header hold it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowDeviceRebuild {
    /// How long each read took to answer, in nanoseconds. Replay answers at
    /// once; the delay is kept to describe the device.
    pub read_delay_ns: u64,
}

/// One access as the device saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeenAccess {
    /// Order of arrival at the device, from 0.
    pub order: u64,
    /// The access.
    pub access: GuestAccess,
}

/// What reached a [`SlowDevice`]; shared with the test that made it.
#[derive(Debug, Default)]
pub struct SlowDeviceProbe {
    handled: AtomicU64,
    seen: Mutex<Vec<SeenAccess>>,
    stopped: AtomicU64,
}

impl SlowDeviceProbe {
    /// Accesses that reached the device.
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Acquire)
    }

    /// Every access that reached the device, in order of arrival, if the
    /// device was configured to record them.
    pub fn seen(&self) -> Vec<SeenAccess> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the device has been told it stopped (its state then drops).
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire) != 0
    }
}

/// The register state. Shared with the deferred reads, which read it when
/// they answer; all of them run on the device's actor, one at a time, so
/// relaxed atomics suffice (they only make the state `Sync`).
#[derive(Debug, Default)]
struct Registers {
    data: AtomicU64,
    reads: AtomicU64,
}

impl Registers {
    fn read(&self, offset: u64) -> u64 {
        match offset {
            REG_ID => SLOW_ID,
            REG_DATA => self.data.load(Ordering::Relaxed),
            REG_COUNTER => {
                let reads = self.reads.fetch_add(1, Ordering::Relaxed) + 1;
                COUNTER_TAG | (reads & 0x00ff_ffff)
            }
            _ => 0,
        }
    }
}

/// The slow test device.
#[derive(Debug)]
pub struct SlowDevice {
    config: SlowDeviceConfig,
    registers: Arc<Registers>,
    probe: Arc<SlowDeviceProbe>,
}

impl SlowDevice {
    /// A device and the probe that watches it.
    pub fn new(config: SlowDeviceConfig) -> (Self, Arc<SlowDeviceProbe>) {
        let probe = Arc::new(SlowDeviceProbe::default());
        let dev = SlowDevice {
            config,
            registers: Arc::default(),
            probe: Arc::clone(&probe),
        };
        (dev, probe)
    }

    /// What replay needs to rebuild this device.
    pub fn rebuild_info(&self) -> SlowDeviceRebuild {
        SlowDeviceRebuild::new(self.config.read_delay)
    }

    /// A device rebuilt for replay: the same replies, at once.
    pub fn replay(_info: &SlowDeviceRebuild) -> Self {
        SlowDevice::new(SlowDeviceConfig::default()).0
    }
}

impl SlowDeviceRebuild {
    /// The rebuild data of a device whose reads take `read_delay`.
    pub fn new(read_delay: Duration) -> Self {
        SlowDeviceRebuild {
            read_delay_ns: u64::try_from(read_delay.as_nanos()).unwrap_or(u64::MAX),
        }
    }
}

impl Device for SlowDevice {
    type Event = ();

    fn kind(&self) -> &'static str {
        KIND
    }

    fn access(&mut self, access: &GuestAccess) -> Completion {
        let order = self.probe.handled.fetch_add(1, Ordering::AcqRel);
        if self.config.record {
            self.probe
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(SeenAccess {
                    order,
                    access: *access,
                });
        }
        match access.op {
            AccessOp::Write { value } => {
                if access.offset.0 == REG_DATA {
                    let value = value & access.size.mask();
                    self.registers.data.store(value, Ordering::Relaxed);
                }
                Completion::Ready(AccessReply::Written)
            }
            AccessOp::Read => {
                let (offset, mask) = (access.offset.0, access.size.mask());
                if self.config.read_delay.is_zero() {
                    let value = self.registers.read(offset) & mask;
                    Completion::Ready(AccessReply::Read { value })
                } else {
                    let delay = self.config.read_delay;
                    let registers = Arc::clone(&self.registers);
                    Completion::Later(Box::pin(async move {
                        tokio::time::sleep(delay).await;
                        // Read now, in the poll that answers (see the
                        // module docs).
                        let value = registers.read(offset) & mask;
                        AccessReply::Read { value }
                    }))
                }
            }
        }
    }

    fn stopped(&mut self) {
        self.probe.stopped.store(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use switchboard_runtime::{AccessSize, DeviceRegion, RegionOffset};

    use super::*;

    fn access(offset: u64, op: AccessOp) -> GuestAccess {
        GuestAccess {
            region: DeviceRegion(0),
            offset: RegionOffset(offset),
            size: AccessSize::B4,
            op,
        }
    }

    #[test]
    fn test_fast_device_answers_registers_at_once() {
        let (mut dev, probe) = SlowDevice::new(SlowDeviceConfig {
            record: true,
            ..Default::default()
        });
        let Completion::Ready(r) = dev.access(&access(REG_ID, AccessOp::Read)) else {
            panic!("zero delay must answer at once");
        };
        assert_eq!(r, AccessReply::Read { value: SLOW_ID });
        dev.access(&access(
            REG_DATA,
            AccessOp::Write {
                value: 0x1_2345_6789,
            },
        ));
        let Completion::Ready(r) = dev.access(&access(REG_DATA, AccessOp::Read)) else {
            panic!("zero delay must answer at once");
        };
        assert_eq!(
            r,
            AccessReply::Read { value: 0x2345_6789 },
            "masked to 4 bytes"
        );
        assert_eq!(probe.handled(), 3);
        assert_eq!(probe.seen()[1].order, 1);
    }

    #[test]
    fn test_slow_reads_are_deferred_and_writes_are_not() {
        let cfg = SlowDeviceConfig {
            read_delay: Duration::from_millis(1),
            record: false,
        };
        let (mut dev, _) = SlowDevice::new(cfg);
        assert!(matches!(
            dev.access(&access(REG_COUNTER, AccessOp::Read)),
            Completion::Later(_)
        ));
        assert!(matches!(
            dev.access(&access(REG_DATA, AccessOp::Write { value: 1 })),
            Completion::Ready(AccessReply::Written)
        ));
    }

    #[actix_rt::test]
    async fn test_a_deferred_read_takes_its_value_when_it_is_answered() {
        let cfg = SlowDeviceConfig {
            read_delay: Duration::from_millis(1),
            record: false,
        };
        let (mut dev, _) = SlowDevice::new(cfg);
        let Completion::Later(read) = dev.access(&access(REG_DATA, AccessOp::Read)) else {
            panic!("deferred");
        };
        // A write answered while the read waits: the read answers after
        // it, so it sees it (the order a log records them in).
        dev.access(&access(REG_DATA, AccessOp::Write { value: 5 }));
        assert_eq!(read.await, AccessReply::Read { value: 5 });
    }

    #[test]
    fn test_rebuilt_device_answers_the_same_at_once() {
        let cfg = SlowDeviceConfig {
            read_delay: Duration::from_micros(500),
            record: false,
        };
        let (live, _) = SlowDevice::new(cfg);
        let info = live.rebuild_info();
        assert_eq!(info.read_delay_ns, 500_000);
        let json = serde_json::to_value(info).expect("json");
        let back: SlowDeviceRebuild = serde_json::from_value(json).expect("rebuild data");
        let mut dev = SlowDevice::replay(&back);
        dev.access(&access(REG_DATA, AccessOp::Write { value: 9 }));
        for (reg, value) in [
            (REG_DATA, 9),
            (REG_COUNTER, COUNTER_TAG | 1),
            (REG_ID, SLOW_ID),
        ] {
            let Completion::Ready(r) = dev.access(&access(reg, AccessOp::Read)) else {
                panic!("replay answers at once");
            };
            assert_eq!(r, AccessReply::Read { value });
        }
    }

    #[actix_rt::test]
    async fn test_counter_read_is_tagged_and_never_all_ones() {
        let cfg = SlowDeviceConfig {
            read_delay: Duration::from_millis(1),
            record: false,
        };
        let (mut dev, _) = SlowDevice::new(cfg);
        for n in 1..=3u64 {
            let Completion::Later(fut) = dev.access(&access(REG_COUNTER, AccessOp::Read)) else {
                panic!("deferred");
            };
            assert_eq!(
                fut.await,
                AccessReply::Read {
                    value: COUNTER_TAG | n
                }
            );
        }
    }
}
