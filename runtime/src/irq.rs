// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Interrupt lines as messages.
//!
//! A device raises and lowers a level-triggered line by sending [`IrqLevel`]
//! to whatever owns the interrupt controller. [`IrqLine`] sends only on a
//! change of level, so a device can call [`IrqLine::set`] after every access.

use std::fmt;

use actix::prelude::*;
use serde::{Deserialize, Serialize};

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

/// One device's output to one interrupt line.
pub struct IrqLine {
    line: IrqNumber,
    sink: Option<Recipient<IrqLevel>>,
    high: bool,
}

impl fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IrqLine")
            .field("line", &self.line)
            .field("high", &self.high)
            .field("connected", &self.sink.is_some())
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
        }
    }

    /// A line connected to nothing: levels are tracked but not sent.
    pub fn disconnected(line: IrqNumber) -> Self {
        IrqLine {
            line,
            sink: None,
            high: false,
        }
    }

    /// Sets the level, sending a message only if it changed.
    pub fn set(&mut self, high: bool) {
        if high == self.high {
            return;
        }
        self.high = high;
        if let Some(sink) = &self.sink {
            sink.do_send(IrqLevel {
                line: self.line,
                high,
            });
        }
    }

    /// The current level.
    pub fn is_high(&self) -> bool {
        self.high
    }
}
