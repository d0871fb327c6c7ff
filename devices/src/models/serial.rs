// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The 16550A UART as a device actor.
//!
//! [`Serial`] joins the register model ([`Uart16550`]), a character backend
//! ([`CharBackendT`]) and an interrupt line ([`IrqLine`]):
//!
//! - every guest access goes to the model; accesses wider than one byte are
//!   split into byte accesses at consecutive offsets, as a byte-wide chip on
//!   a bus sees them;
//! - after each access, transmitted bytes are written to the backend, and the
//!   line is raised or lowered by message on each change of the model's
//!   interrupt output;
//! - input reaches the actor as [`SerialEvent::Input`] messages, is queued
//!   here, and is fed to the receive FIFO only as fast as the FIFO has room.
//!   Nothing is dropped for a slow guest until the queue holds
//!   [`INPUT_QUEUE_LIMIT`] bytes; beyond that input is dropped and counted,
//!   never blocking the actor.
//!
//! # Recording
//!
//! A UART made [`recorded`](Serial::recorded) (as [`spawn_serial`] makes
//! it) shows the runtime's journal everything that reaches it from outside
//! the guest, and everything it signals: each input it takes, as a
//! [`SerialInput`] from `sink`, and each change of its interrupt line, as an
//! [`IrqLevel`](switchboard_runtime::IrqLevel) to `irq/N`. Both are
//! journalled from the device's handler, so a message log holds them in the
//! order the device handled them, between its accesses; the interrupt
//! messages an access or input caused come just before its record. The
//! register model has no timers (transmission is instant), so nothing else
//! decides a reply: [`Serial::replay`] rebuilds the device from
//! [`SerialRebuild`] and the log's records give the same replies and
//! interrupt messages.
//!
//! [`spawn_serial`] opens a [`Sink`], starts the actor, and starts the input
//! pump thread. The pump's channel is fed by the backend's reader threads,
//! which hold the only senders; when the device stops, its backend is
//! dropped, the readers exit, the channel disconnects and the pump ends. The
//! pump also ends as soon as the actor's mailbox is closed.

use std::collections::VecDeque;
use std::thread;

use actix::{ArbiterHandle, Recipient};
use serde::{Deserialize, Serialize};
use switchboard_runtime::recording::{Data, RecordKind};
use switchboard_runtime::{
    spawn_device, AccessOp, AccessReply, ActorId, Completion, Deliver, Device, DeviceFailed,
    DeviceId, GuestAccess, IrqLine, IrqNumber, Request, Runtime, SpawnedDevice,
};

use crate::models::uart::{IrqChange, Uart16550};
use crate::models::uart_sink::{self, CharBackend, CharBackendT, Sink};

/// Size of the UART's register region on a bus.
pub const SERIAL_REGION_SIZE: u64 = 8;

/// The device kind, as in a topology file and in logs.
pub const KIND: &str = "uart-16550";

/// Bytes of input held for a guest that is not reading them.
pub const INPUT_QUEUE_LIMIT: usize = 64 * 1024;

/// Inputs of a [`Serial`] device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum SerialEvent {
    /// Bytes arrived on the line.
    Input(Vec<u8>),
}

/// The record of input a [`Serial`] took from its sink: a one-way message
/// from `sink` to the device (type `input`), journalled once the device has
/// taken it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialInput {
    /// The bytes as they arrived, always by value: replay feeds them to the
    /// device again.
    pub data: Data,
}

impl Request for SerialInput {
    /// One-way: the sink waits for nothing.
    type Reply = ();

    fn kind(&self) -> &'static str {
        RecordKind::Input.as_str()
    }
}

/// The actor a log names as the sender of a UART's input.
pub const SINK_ACTOR: &str = "sink";

/// What replay needs to rebuild a [`Serial`] (its `added` record and the
/// log header hold it): the register model starts in its reset state, so
/// only the interrupt line is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialRebuild {
    /// The interrupt line it raises.
    pub irq: IrqNumber,
}

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The character backend could not be opened.
    #[error("Open the character backend of {id}")]
    OpenBackend {
        /// The device.
        id: DeviceId,
        /// Why.
        #[source]
        source: uart_sink::Error,
    },
    /// The input pump thread could not be started.
    #[error("Start the input thread of {id}")]
    SpawnPump {
        /// The device.
        id: DeviceId,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where a recorded UART journals its input.
struct Recording {
    runtime: Runtime,
    /// [`SINK_ACTOR`].
    sink: ActorId,
    /// The device's actor.
    device: ActorId,
}

/// A 16550A UART device.
pub struct Serial {
    uart: Uart16550,
    backend: Box<dyn CharBackendT>,
    irq: IrqLine,
    input: VecDeque<u8>,
    output: Vec<u8>,
    dropped_input: u64,
    failed_writes: u64,
    recording: Option<Recording>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("uart", &self.uart)
            .field("irq", &self.irq)
            .field("queued_input", &self.input.len())
            .finish()
    }
}

impl Serial {
    /// A UART writing to `backend` and signalling on `irq`.
    pub fn new(backend: Box<dyn CharBackendT>, irq: IrqLine) -> Self {
        Serial {
            uart: Uart16550::new(),
            backend,
            irq,
            input: VecDeque::new(),
            output: Vec::new(),
            dropped_input: 0,
            failed_writes: 0,
            recording: None,
        }
    }

    /// The same UART, showing `runtime`'s journal each input it takes and
    /// each interrupt message it sends, as device `id` (see the module
    /// docs). Without a journal in `runtime` this costs a branch.
    pub fn recorded(mut self, runtime: &Runtime, id: &DeviceId) -> Self {
        self.irq = self.irq.journalled(runtime, id.actor_id());
        self.recording = Some(Recording {
            runtime: runtime.clone(),
            sink: ActorId::new(SINK_ACTOR),
            device: id.actor_id(),
        });
        self
    }

    /// What replay needs to rebuild this device.
    pub fn rebuild_info(&self) -> SerialRebuild {
        SerialRebuild {
            irq: self.irq.line(),
        }
    }

    /// A UART rebuilt for replay: the same replies and interrupt levels,
    /// with its output discarded and its line connected to nothing (make
    /// it [`recorded`](Serial::recorded) to see its interrupt messages).
    pub fn replay(info: &SerialRebuild) -> Self {
        Serial::new(Box::new(Discard), IrqLine::disconnected(info.irq))
    }

    /// Input bytes dropped because the queue was full.
    pub fn dropped_input(&self) -> u64 {
        self.dropped_input
    }

    fn feed_input(&mut self) {
        while !self.input.is_empty() {
            let room = self.uart.rx_space();
            if room == 0 {
                break;
            }
            let n = room.min(self.input.len());
            let chunk: Vec<u8> = self.input.drain(..n).collect();
            let taken = self.uart.receive(&chunk);
            debug_assert_eq!(taken, n, "the model took less than it had room for");
        }
    }

    /// Pushes output to the backend and the interrupt level to the line.
    fn settle(&mut self) {
        self.uart.drain_output_into(&mut self.output);
        if !self.output.is_empty() {
            if let Err(e) = self.backend.write(&self.output) {
                self.failed_writes += 1;
                tracing::warn!(error = %e, bytes = self.output.len(), "serial output lost");
            }
            self.output.clear();
        }
        match self.uart.take_irq_change() {
            IrqChange::Unchanged => {}
            IrqChange::Raised => self.irq.set(true),
            IrqChange::Lowered => self.irq.set(false),
            IrqChange::Retriggered => {
                self.irq.set(false);
                self.irq.set(true);
            }
        }
    }
}

impl Device for Serial {
    type Event = SerialEvent;

    fn kind(&self) -> &'static str {
        KIND
    }

    fn access(&mut self, access: &GuestAccess) -> Completion {
        let bytes = access.size.bytes();
        let reply = match access.op {
            AccessOp::Read => {
                let mut value = 0u64;
                for i in 0..bytes {
                    let offset = access.offset.0.saturating_add(i);
                    let byte = u8::try_from(offset).map_or(0xff, |o| self.uart.read(o));
                    value |= u64::from(byte) << (8 * i);
                    // Reading RBR makes room: refill before the next byte.
                    self.feed_input();
                }
                AccessReply::Read { value }
            }
            AccessOp::Write { value } => {
                for i in 0..bytes {
                    let offset = access.offset.0.saturating_add(i);
                    if let Ok(o) = u8::try_from(offset) {
                        self.uart.write(o, (value >> (8 * i)) as u8);
                    }
                    self.feed_input();
                }
                AccessReply::Written
            }
        };
        self.settle();
        Completion::Ready(reply)
    }

    fn event(&mut self, event: SerialEvent) {
        match event {
            SerialEvent::Input(bytes) => {
                let room = INPUT_QUEUE_LIMIT.saturating_sub(self.input.len());
                let kept = bytes.len().min(room);
                self.input.extend(&bytes[..kept]);
                if kept < bytes.len() {
                    self.dropped_input += (bytes.len() - kept) as u64;
                    tracing::warn!(dropped = bytes.len() - kept, "serial input queue full");
                }
                self.feed_input();
                self.settle();
                // After the interrupt messages it caused, as an access's
                // record comes after them.
                if let Some(r) = &self.recording {
                    let input = SerialInput {
                        data: Data::Bytes(bytes),
                    };
                    r.runtime.notify(&r.sink, &r.device, &input);
                }
            }
        }
    }

    fn stopped(&mut self) {
        self.irq.set(false);
    }
}

/// The output of a UART under replay: nowhere.
struct Discard;

impl CharBackendT for Discard {
    fn write(&mut self, _: &[u8]) -> uart_sink::Result<()> {
        Ok(())
    }
}

/// Opens `sink`, starts a [`Serial`] on `arbiter`, and pumps the sink's input
/// into it. The UART is [`recorded`](Serial::recorded) on `runtime`.
pub fn spawn_serial(
    runtime: &Runtime,
    id: DeviceId,
    sink: &Sink,
    irq: IrqLine,
    arbiter: &ArbiterHandle,
    supervisor: Option<Recipient<DeviceFailed>>,
) -> Result<SpawnedDevice<SerialEvent>, Error> {
    let (tx, rx) = crossbeam_channel::unbounded::<Vec<u8>>();
    let backend = CharBackend::open(sink, tx).map_err(|source| Error::OpenBackend {
        id: id.clone(),
        source,
    })?;
    let spawned = spawn_device(
        runtime,
        id.clone(),
        Serial::new(Box::new(backend), irq).recorded(runtime, &id),
        arbiter,
        supervisor,
    );
    let events = spawned.events.clone();
    thread::Builder::new()
        .name(format!("serial-in:{id}"))
        .spawn(move || {
            for chunk in rx {
                if events.try_send(Deliver(SerialEvent::Input(chunk))).is_err() {
                    break;
                }
            }
        })
        .map_err(|source| Error::SpawnPump { id, source })?;
    Ok(spawned)
}

#[cfg(test)]
mod tests {
    use switchboard_runtime::{AccessSize, DeviceRegion, IrqNumber, RegionOffset};

    use super::*;
    use crate::models::uart::regs;
    use crate::models::uart_sink::mock::MemorySink;

    fn serial() -> (Serial, MemorySink) {
        let (tx, _rx) = crossbeam_channel::unbounded();
        let sink = MemorySink::new(tx);
        let s = Serial::new(Box::new(sink.clone()), IrqLine::disconnected(IrqNumber(4)));
        (s, sink)
    }

    fn acc(offset: u64, size: AccessSize, op: AccessOp) -> GuestAccess {
        GuestAccess {
            region: DeviceRegion(0),
            offset: RegionOffset(offset),
            size,
            op,
        }
    }

    fn read(s: &mut Serial, offset: u8) -> u8 {
        match s.access(&acc(u64::from(offset), AccessSize::B1, AccessOp::Read)) {
            Completion::Ready(AccessReply::Read { value }) => value as u8,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn write(s: &mut Serial, offset: u8, value: u8) {
        s.access(&acc(
            u64::from(offset),
            AccessSize::B1,
            AccessOp::Write {
                value: u64::from(value),
            },
        ));
    }

    #[test]
    fn test_input_beyond_the_fifo_is_held_not_lost() {
        let (mut s, _) = serial();
        write(&mut s, regs::FCR, 0x01);
        let text: Vec<u8> = (0..100u8).collect();
        s.event(SerialEvent::Input(text.clone()));
        let mut got = Vec::new();
        while read(&mut s, regs::LSR) & 0x01 != 0 {
            got.push(read(&mut s, regs::RBR));
        }
        assert_eq!(got, text);
        assert_eq!(read(&mut s, regs::LSR) & 0x02, 0, "no overrun");
    }

    #[test]
    fn test_wide_write_is_split_into_byte_registers() {
        let (mut s, sink) = serial();
        // THR then IER in one 2-byte write.
        s.access(&acc(0, AccessSize::B2, AccessOp::Write { value: 0x0041 }));
        assert_eq!(sink.output_bytes(), b"A");
        let r = s.access(&acc(7, AccessSize::B2, AccessOp::Read));
        // SCR (0) then an offset past the chip, which reads all-ones.
        assert!(matches!(
            r,
            Completion::Ready(AccessReply::Read { value: 0xff00 })
        ));
    }

    #[test]
    fn test_recorded_uart_journals_input_after_the_interrupts_it_caused() {
        use std::sync::Arc;
        use switchboard_runtime::{JournalRecord, MemoryJournal};

        let journal = Arc::new(MemoryJournal::new());
        let rt = Runtime::with_journal(journal.clone());
        let (s, _) = serial();
        let mut s = s.recorded(&rt, &DeviceId::new("com1"));
        write(&mut s, regs::MCR, regs::MCR_OUT2);
        write(&mut s, regs::IER, regs::IER_ERBFI);
        assert!(journal.records().is_empty(), "no interrupt yet");
        s.event(SerialEvent::Input(b"hi".to_vec()));
        let sent: Vec<(String, String, String, serde_json::Value)> = journal
            .records()
            .into_iter()
            .filter_map(|r| match r {
                JournalRecord::Sent {
                    from,
                    to,
                    kind,
                    payload,
                    ..
                } => Some((from.to_string(), to.to_string(), kind, payload)),
                JournalRecord::Replied { .. } => None,
            })
            .collect();
        assert_eq!(
            sent,
            vec![
                (
                    "dev:com1".into(),
                    "irq/4".into(),
                    "irq".into(),
                    serde_json::json!({ "line": 4, "high": true })
                ),
                (
                    "sink".into(),
                    "dev:com1".into(),
                    "input".into(),
                    serde_json::json!({ "data": "b64:aGk=" })
                ),
            ]
        );
    }

    #[test]
    fn test_rebuilt_uart_answers_as_the_live_one() {
        let (mut live, _) = serial();
        let info = live.rebuild_info();
        assert_eq!(info, SerialRebuild { irq: IrqNumber(4) });
        let json = serde_json::to_value(info).expect("json");
        let mut rebuilt = Serial::replay(&serde_json::from_value(json).expect("rebuild data"));
        for s in [&mut live, &mut rebuilt] {
            write(s, regs::FCR, 0x01);
            write(s, regs::MCR, regs::MCR_OUT2);
            write(s, regs::IER, regs::IER_ERBFI | regs::IER_ETBEI);
            write(s, regs::THR, b'x');
            s.event(SerialEvent::Input(b"abc".to_vec()));
        }
        for reg in [
            regs::IIR,
            regs::LSR,
            regs::RBR,
            regs::RBR,
            regs::IIR,
            regs::LSR,
        ] {
            assert_eq!(
                read(&mut live, reg),
                read(&mut rebuilt, reg),
                "register {reg}"
            );
        }
        assert_eq!(live.irq.is_high(), rebuilt.irq.is_high());
    }

    #[test]
    fn test_input_queue_limit_drops_and_counts() {
        let (mut s, _) = serial();
        s.event(SerialEvent::Input(vec![b'x'; INPUT_QUEUE_LIMIT + 100]));
        // The FIFO (1 byte without FIFO mode) took some; the queue is full.
        assert!(s.dropped_input() > 0);
        assert!(s.dropped_input() <= 100);
    }
}
