// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Interrupt lines as messages.
//!
//! A device raises and lowers a level-triggered line by sending [`IrqLevel`]
//! to whatever owns the interrupt controller. [`IrqLine`] sends only on a
//! change of level, so a device can call [`IrqLine::set`] after every access.
//!
//! A line made [`journalled`](IrqLine::journalled) also shows each change to
//! the runtime's journal ([`Runtime::notify`]), from the device to `irq/N`,
//! whether or not anything is connected: a message log then holds every
//! interrupt message the device sent, in order with the accesses that
//! caused them, and replay checks them.

use std::fmt;

use actix::prelude::*;
use serde::{Deserialize, Serialize};

use crate::ids::ActorId;
use crate::send::{Request, Runtime};

/// The number of an interrupt line (a GSI, an ISA IRQ).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IrqNumber(pub u32);

/// A line changed level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct IrqLevel {
    /// The line.
    pub line: IrqNumber,
    /// `true` when asserted.
    pub high: bool,
}

impl Request for IrqLevel {
    /// One-way: nothing answers an interrupt message.
    type Reply = ();

    fn kind(&self) -> &'static str {
        crate::recording::RecordKind::Irq.as_str()
    }
}

impl fmt::Display for IrqNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The actor a journal names as the receiver of a line's messages:
/// `irq/N`, whatever delivers line N to the guest.
pub fn irq_actor(line: IrqNumber) -> ActorId {
    ActorId::new(format!("irq/{line}"))
}

/// Where a journalled line shows its messages.
struct Journalled {
    runtime: Runtime,
    /// The device raising the line.
    from: ActorId,
    /// [`irq_actor`] of the line.
    to: ActorId,
}

/// One device's output to one interrupt line.
pub struct IrqLine {
    line: IrqNumber,
    sink: Option<Recipient<IrqLevel>>,
    high: bool,
    journal: Option<Journalled>,
}

impl fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IrqLine")
            .field("line", &self.line)
            .field("high", &self.high)
            .field("connected", &self.sink.is_some())
            .field("journalled", &self.journal.is_some())
            .finish()
    }
}

impl IrqLine {
    /// A line delivering to `sink`.
    pub fn new(line: IrqNumber, sink: Recipient<IrqLevel>) -> Self {
        IrqLine {
            line,
            sink: Some(sink),
            high: false,
            journal: None,
        }
    }

    /// A line connected to nothing: levels are tracked but not sent.
    pub fn disconnected(line: IrqNumber) -> Self {
        IrqLine {
            line,
            sink: None,
            high: false,
            journal: None,
        }
    }

    /// The same line, also showing every change of level to `runtime`'s
    /// journal as a message from `device` (see the module docs).
    pub fn journalled(mut self, runtime: &Runtime, device: ActorId) -> Self {
        self.journal = Some(Journalled {
            runtime: runtime.clone(),
            from: device,
            to: irq_actor(self.line),
        });
        self
    }

    /// The line's number.
    pub fn line(&self) -> IrqNumber {
        self.line
    }

    /// Sets the level, sending a message only if it changed.
    pub fn set(&mut self, high: bool) {
        if high == self.high {
            return;
        }
        self.high = high;
        let msg = IrqLevel {
            line: self.line,
            high,
        };
        if let Some(j) = &self.journal {
            j.runtime.notify(&j.from, &j.to, &msg);
        }
        if let Some(sink) = &self.sink {
            sink.do_send(msg);
        }
    }

    /// The current level.
    pub fn is_high(&self) -> bool {
        self.high
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::journal::{JournalRecord, MemoryJournal};

    #[test]
    fn test_journalled_line_records_each_change_once_with_no_reply() {
        let journal = Arc::new(MemoryJournal::new());
        let rt = Runtime::with_journal(journal.clone());
        let mut line =
            IrqLine::disconnected(IrqNumber(4)).journalled(&rt, ActorId::new("dev:com1"));
        line.set(true);
        line.set(true);
        line.set(false);
        let recs = journal.records();
        assert_eq!(recs.len(), 4, "{recs:?}");
        let JournalRecord::Sent {
            seq,
            from,
            to,
            kind,
            payload,
            ..
        } = &recs[0]
        else {
            panic!("a send first: {recs:?}");
        };
        assert_eq!(
            (from.as_str(), to.as_str(), kind.as_str()),
            ("dev:com1", "irq/4", "irq")
        );
        assert_eq!(payload, &serde_json::json!({ "line": 4, "high": true }));
        let JournalRecord::Replied {
            seq: answered,
            reply,
            ..
        } = &recs[1]
        else {
            panic!("answered at once: {recs:?}");
        };
        assert_eq!((answered, reply), (seq, &serde_json::Value::Null));
        let JournalRecord::Sent { payload, .. } = &recs[2] else {
            panic!("the second change: {recs:?}");
        };
        assert_eq!(payload["high"], false);
    }

    #[test]
    fn test_line_without_a_journal_only_tracks_the_level() {
        let rt = Runtime::new();
        let mut line = IrqLine::disconnected(IrqNumber(3)).journalled(&rt, ActorId::new("dev:d"));
        line.set(true);
        assert!(line.is_high());
        assert_eq!(line.line(), IrqNumber(3));
    }
}
