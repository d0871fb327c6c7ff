// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Replay of the devices a device actor hosts on a bus: the UART and the
//! test device.
//!
//! Such a device's state lives in its registers, so its records are fed in
//! log order, which is the order the device handled them (see "One-way
//! messages" in the runtime's design): each access the bus forwarded to it
//! (`read`, `write`) and each input it took from outside (`input`). The
//! device is rebuilt from its rebuild data with no sink and no timers, and
//! called directly, as its actor calls it; every reply is compared with the
//! recorded one.
//!
//! Its interrupt messages (`irq`, from the device to `irq/N`) are checked
//! too. The replayed device's interrupt line is journalled into a tap, and
//! the messages it sends while handling a record must be exactly those
//! recorded since the device's previous record: a record follows the
//! interrupt messages it caused. A difference is reported at the first
//! recorded interrupt message that differs, or, for one the log does not
//! hold, at the record that caused it.
//!
//! An access the runtime refused (the device was draining, not running, or
//! gone) never reached the device, and is not fed to it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use switchboard_runtime::journal::{Journal, Replied, Sent};
use switchboard_runtime::recording::RecordKind;
use switchboard_runtime::{
    AccessOp, AccessReply, Completion, Device, DeviceId, GuestAccess, IrqLevel, Refused, Runtime,
};

use super::{Earlier, Mismatch, Msg, Replayer};
use crate::models::serial::{Serial, SerialEvent, SerialInput, SerialRebuild};
use crate::models::slow::{SlowDevice, SlowDeviceRebuild};

/// The record type of an interrupt message.
pub(super) const IRQ: &str = RecordKind::Irq.as_str();
/// The record type of an input from outside.
const INPUT: &str = RecordKind::Input.as_str();

/// Collects the interrupt messages a replayed device sends.
#[derive(Debug, Default)]
struct IrqTap(Mutex<Vec<IrqLevel>>);

impl IrqTap {
    fn take(&self) -> Vec<IrqLevel> {
        // A push cannot leave the vector inconsistent.
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Journal for IrqTap {
    fn sent(&self, r: &Sent<'_>) {
        if r.kind != IRQ {
            return;
        }
        if let Ok(level) = serde_json::from_value::<IrqLevel>(r.payload.to_json()) {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(level);
        }
    }

    fn replied(&self, _: &Replied<'_>) {}
}

/// An interrupt message as recorded, waiting for the record that caused it.
struct RecordedIrq {
    seq: u64,
    line: u64,
    text: String,
    level: IrqLevel,
}

/// A device of a device actor, under replay.
pub(super) struct DeviceReplayer<D: Device> {
    device: D,
    /// Turns an `input` record's payload into the device's event.
    input: fn(&str) -> Result<D::Event, String>,
    tap: Arc<IrqTap>,
    /// Interrupt messages recorded since the device's previous record.
    expected: Vec<RecordedIrq>,
}

/// A UART rebuilt from `spec`, as actor `id`.
pub(super) fn uart(id: &str, spec: serde_json::Value) -> Result<Box<dyn Replayer>, String> {
    let info: SerialRebuild =
        serde_json::from_value(spec).map_err(|e| format!("bad rebuild data: {e}"))?;
    let id = DeviceId::new(id);
    Ok(Box::new(DeviceReplayer::new(
        |rt| Serial::replay(&info).recorded(rt, &id),
        serial_input,
    )))
}

/// A test device rebuilt from `spec`.
pub(super) fn test_device(spec: serde_json::Value) -> Result<Box<dyn Replayer>, String> {
    let info: SlowDeviceRebuild =
        serde_json::from_value(spec).map_err(|e| format!("bad rebuild data: {e}"))?;
    Ok(Box::new(DeviceReplayer::new(
        |_| SlowDevice::replay(&info),
        |_| Err("the test device takes no input".into()),
    )))
}

fn serial_input(payload: &str) -> Result<SerialEvent, String> {
    let input: SerialInput =
        serde_json::from_str(payload).map_err(|e| format!("bad input payload: {e}"))?;
    match input.data {
        switchboard_runtime::recording::Data::Bytes(b) => Ok(SerialEvent::Input(b)),
        switchboard_runtime::recording::Data::Hash { len, .. } => Err(format!(
            "the input's {len} bytes were recorded as a hash; replay needs the bytes"
        )),
    }
}

fn show_level(l: &IrqLevel) -> String {
    format!("line {} {}", l.line, if l.high { "high" } else { "low" })
}

fn show_answer(a: &Result<AccessReply, Refused>) -> String {
    match a {
        Ok(AccessReply::Read { value }) => format!("read {value:#x}"),
        Ok(AccessReply::Written) => "written".into(),
        Err(refused) => format!("refused: {refused}"),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic".to_string()
    }
}

impl<D: Device> DeviceReplayer<D> {
    fn new(build: impl FnOnce(&Runtime) -> D, input: fn(&str) -> Result<D::Event, String>) -> Self {
        let tap = Arc::new(IrqTap::default());
        let runtime = Runtime::with_journal(Arc::clone(&tap) as Arc<dyn Journal>);
        DeviceReplayer {
            device: build(&runtime),
            input,
            tap,
            expected: Vec::new(),
        }
    }

    /// Runs `f` on the device; a panic is a divergence (the recording
    /// answered this record, so its device did not panic on it).
    fn run<T>(&mut self, expected: &str, f: impl FnOnce(&mut D) -> T) -> Result<T, Mismatch> {
        catch_unwind(AssertUnwindSafe(|| f(&mut self.device))).map_err(|p| {
            Mismatch::new(
                "the replayed device panicked",
                expected.to_string(),
                format!("a panic: {}", panic_message(p.as_ref())),
            )
        })
    }

    /// Compares the interrupt messages the device sent while handling the
    /// record `cause` with those recorded before it. `Ok(Err(_))` is an
    /// interrupt message the log does not hold: a divergence at `cause`,
    /// reported after its reply is compared.
    fn irqs(&mut self, cause: &Msg<'_>, compare: bool) -> Result<Result<(), Mismatch>, Mismatch> {
        let actual = self.tap.take();
        let expected = std::mem::take(&mut self.expected);
        if !compare {
            return Ok(Ok(()));
        }
        let caused_by = format!("caused by the {} at seq {}", cause.kind, cause.seq);
        for (i, e) in expected.iter().enumerate() {
            let earlier = Earlier {
                seq: e.seq,
                line: e.line,
                kind: IRQ,
                message: e.text.clone(),
            };
            match actual.get(i) {
                Some(a) if *a == e.level => {}
                Some(a) => {
                    return Err(Mismatch::new(
                        format!("interrupt message {caused_by}"),
                        show_level(&e.level),
                        show_level(a),
                    )
                    .at(earlier))
                }
                None => {
                    return Err(Mismatch::new(
                        format!(
                            "interrupt message {caused_by}: the replayed device did not send it"
                        ),
                        show_level(&e.level),
                        "no interrupt message",
                    )
                    .at(earlier))
                }
            }
        }
        Ok(match actual.get(expected.len()) {
            Some(a) => Err(Mismatch::new(
                "an interrupt message the log does not hold, sent while handling this message",
                "no interrupt message",
                show_level(a),
            )),
            None => Ok(()),
        })
    }

    fn access(&mut self, msg: &Msg<'_>, compare: bool) -> Result<(), Mismatch> {
        let (payload, reply) = msg.body.raw();
        let access: GuestAccess = serde_json::from_str(payload).map_err(|e| {
            Mismatch::new("the payload is not an access", "an access", e.to_string())
        })?;
        let recorded: Result<AccessReply, Refused> = serde_json::from_str(reply)
            .map_err(|e| Mismatch::new("the reply is not an access's", "a reply", e.to_string()))?;
        if recorded.is_err() {
            // Refused by the runtime: the device never saw it.
            return Ok(());
        }
        let shown = show_answer(&recorded);
        let completion = self.run(&shown, |d| d.access(&access))?;
        let actual = match completion {
            Completion::Ready(r) => r,
            // A rebuilt device answers at once; a deferred answer is
            // awaited here all the same.
            Completion::Later(fut) => {
                let fut = AssertUnwindSafe(fut);
                self.run(&shown, |_| futures::executor::block_on(fut))?
            }
        };
        let extra = self.irqs(msg, compare)?;
        if compare && recorded != Ok(actual) {
            let what = match access.op {
                AccessOp::Read => "read",
                AccessOp::Write { .. } => "write",
            };
            return Err(Mismatch::new(
                format!(
                    "reply to the {}-byte {what} at offset {:#x} of region {}",
                    access.size.bytes(),
                    access.offset.0,
                    access.region.0
                ),
                shown,
                show_answer(&Ok(actual)),
            ));
        }
        extra
    }
}

impl<D: Device> Replayer for DeviceReplayer<D> {
    fn replay(&mut self, msg: Msg<'_>, compare: bool) -> Result<(), Mismatch> {
        match msg.kind {
            IRQ => {
                let level: IrqLevel = serde_json::from_str(msg.body.raw().0).map_err(|e| {
                    Mismatch::new(
                        "the payload is not an interrupt message",
                        "line and level",
                        e.to_string(),
                    )
                })?;
                self.expected.push(RecordedIrq {
                    seq: msg.seq,
                    line: msg.line,
                    text: msg.text.abbreviate(200),
                    level,
                });
                Ok(())
            }
            INPUT => {
                let event = (self.input)(msg.body.raw().0)
                    .map_err(|e| Mismatch::new("the input cannot be fed again", "an input", e))?;
                self.run("the input taken", |d| d.event(event))?;
                self.irqs(&msg, compare)?
            }
            "read" | "write" => self.access(&msg, compare),
            other if compare => Err(Mismatch::new(
                "a message type the device does not take",
                "read, write, input or irq",
                other.to_string(),
            )),
            _ => Ok(()),
        }
    }

    fn removed(&mut self, msg: Msg<'_>, compare: bool) -> Result<(), Mismatch> {
        self.run("a drained device", |d| {
            d.drain_started();
            d.stopped();
        })?;
        self.irqs(&msg, compare)?
    }

    fn finish(&mut self) -> Result<(), Mismatch> {
        match self.expected.first() {
            None => Ok(()),
            Some(e) => Err(Mismatch::new(
                "an interrupt message with no record of what caused it after it",
                show_level(&e.level),
                "no interrupt message",
            )
            .at(Earlier {
                seq: e.seq,
                line: e.line,
                kind: IRQ,
                message: e.text.clone(),
            })),
        }
    }

    fn stateful(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use serde_json::{json, Value};
    use switchboard_runtime::recording::{DataMode, Header};

    use super::super::{replay, ReplayError, ReplayOptions};

    /// A log of `records` (`from`, `to`, `type`, `payload`, `reply`), the
    /// header listing no actor.
    fn log(dir: &Path, records: &[(&str, &str, &str, Value, Value)]) -> PathBuf {
        let header = Header::new("test".into(), DataMode::Hash, json!({}), Vec::new());
        let mut text = serde_json::to_string(&header).expect("header") + "\n";
        for (i, (from, to, kind, payload, reply)) in records.iter().enumerate() {
            let line = json!({
                "seq": i + 1, "time": i, "latency": 0, "from": from, "to": to,
                "type": kind, "payload": payload, "reply": reply,
            });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        let path = dir.join("log");
        std::fs::write(&path, text).expect("write the log");
        path
    }

    fn added(id: &str, kind: &str, rebuild: Value) -> (&'static str, String, Value) {
        (
            "added",
            id.to_string(),
            json!({ "id": id, "kind": kind, "rebuild": rebuild }),
        )
    }

    fn access(offset: u64, op: Value, reply: Value) -> (Value, Value) {
        let mut payload = json!({ "region": 0, "offset": offset, "size": 4 });
        if let (Some(p), Some(o)) = (payload.as_object_mut(), op.as_object()) {
            p.extend(o.clone());
        }
        (payload, reply)
    }

    #[test]
    fn test_a_gap_ends_the_replay_of_a_device_with_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (kind, id, info) = added("slow0", "test-device", json!({ "read_delay_ns": 0 }));
        let (w, w_reply) = access(
            8,
            json!({ "op": "write", "value": 5 }),
            json!({ "Ok": { "reply": "written" } }),
        );
        let (r, r_reply) = access(
            8,
            json!({ "op": "read" }),
            json!({ "Ok": { "reply": "read", "value": 5 } }),
        );
        // After the gap, a read the device would answer otherwise (the
        // write it saw was lost).
        let (_, later) = access(
            8,
            json!({ "op": "read" }),
            json!({ "Ok": { "reply": "read", "value": 7 } }),
        );
        let path = log(
            dir.path(),
            &[
                ("switchboard", &id, kind, info, Value::Null),
                ("mmio0", "slow0", "write", w, w_reply),
                ("mmio0", "slow0", "read", r.clone(), r_reply),
                (
                    "recorder",
                    "recorder",
                    "gap",
                    json!({ "dropped": 1 }),
                    Value::Null,
                ),
                ("mmio0", "slow0", "read", r, later),
            ],
        );
        let report = replay(&path, &ReplayOptions::default()).expect("no divergence");
        assert_eq!(report.per_actor.get("slow0"), Some(&2));
        let (n, why) = report
            .not_replayable
            .get("slow0")
            .expect("not replayed after the gap");
        assert_eq!(*n, 1);
        assert!(why.contains("the gap at seq 4"), "{why}");
        let only = ReplayOptions {
            device: Some("slow0".into()),
            ..ReplayOptions::default()
        };
        assert!(
            replay(&path, &only).is_ok(),
            "replayed in part, not refused"
        );
    }

    #[test]
    fn test_an_interrupt_message_with_no_record_after_it_of_its_cause_is_a_divergence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (kind, id, info) = added("com1", "uart-16550", json!({ "irq": 4 }));
        let path = log(
            dir.path(),
            &[
                ("switchboard", &id, kind, info, Value::Null),
                (
                    "com1",
                    "irq/4",
                    "irq",
                    json!({ "line": 4, "high": true }),
                    Value::Null,
                ),
            ],
        );
        let Err(ReplayError::Diverged(d)) = replay(&path, &ReplayOptions::default()) else {
            panic!("no divergence");
        };
        assert_eq!((d.seq, d.line, d.kind.as_str()), (2, 3, "irq"));
        assert!(d.what.contains("no record of what caused it"), "{}", d.what);
        assert!(d.to_string().contains("irq message from com1"), "{d}");
        // Stopped by --until before its cause: nothing to say.
        let until = ReplayOptions {
            until: Some(1),
            ..ReplayOptions::default()
        };
        assert!(replay(&path, &until).is_ok());
    }

    #[test]
    fn test_an_access_the_runtime_refused_is_not_fed_to_the_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (kind, id, info) = added("slow0", "test-device", json!({ "read_delay_ns": 0 }));
        let (c, refused) = access(
            16,
            json!({ "op": "read" }),
            json!({ "Err": { "refused": "draining" } }),
        );
        let (_, first) = access(
            16,
            json!({ "op": "read" }),
            json!({ "Ok": { "reply": "read", "value": 0x5100_0001u64 } }),
        );
        let path = log(
            dir.path(),
            &[
                ("switchboard", &id, kind, info, Value::Null),
                ("mmio0", "slow0", "read", c.clone(), refused),
                ("mmio0", "slow0", "read", c, first),
            ],
        );
        let report = replay(&path, &ReplayOptions::default()).expect("no divergence");
        assert_eq!(report.per_actor.get("slow0"), Some(&2));
    }

    #[test]
    fn test_an_input_recorded_as_a_hash_cannot_be_fed_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (kind, id, info) = added("com1", "uart-16550", json!({ "irq": 4 }));
        let hashed = format!("xxh3:5:{:032x}", 1);
        let path = log(
            dir.path(),
            &[
                ("switchboard", &id, kind, info, Value::Null),
                (
                    "sink",
                    "com1",
                    "input",
                    json!({ "data": hashed }),
                    Value::Null,
                ),
            ],
        );
        let Err(ReplayError::Diverged(d)) = replay(&path, &ReplayOptions::default()) else {
            panic!("no divergence");
        };
        assert_eq!(d.seq, 2);
        assert!(d.actual.contains("recorded as a hash"), "{d}");
    }
}
