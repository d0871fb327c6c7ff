// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The record kinds of a message log: the `type` field of every record.
//!
//! Every writer names its records with a [`RecordKind`] and every reader
//! (replay, the `log` listing) matches on one; the strings exist only here,
//! in [`RecordKind::as_str`] and [`RecordKind::parse`].

use std::fmt;

/// What a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A device was added: its payload is its [`ActorInfo`](super::ActorInfo).
    Added,
    /// A device was removed: the reply holds the drain time or the error.
    Removed,
    /// Records were dropped here (`--record-full gap`).
    Gap,
    /// A frontend connected.
    Connect,
    /// A frontend disconnected.
    Disconnect,
    /// vhost-user SET_FEATURES.
    SetFeatures,
    /// vhost-user GET_CONFIG, with the bytes answered.
    GetConfig,
    /// vhost-user SET_CONFIG, with the bytes written.
    SetConfig,
    /// vhost-user SET_MEM_TABLE (or a region added or removed).
    SetMemTable,
    /// vhost-user GET_VRING_BASE: the queue was drained.
    GetVringBase,
    /// vhost-user RESET_DEVICE.
    ResetDevice,
    /// A descriptor chain that could not be parsed.
    Malformed,
    /// A device was failed (a contained panic, a shrunk memfd), with the
    /// reason (payload `{"reason": ...}`); written for vhost-user devices.
    Failed,
    /// An interrupt message a device sent (one-way).
    Irq,
    /// An input a device took from outside the guest (bytes from a UART's
    /// sink; one-way).
    Input,
    /// A queue recovered after a reconnect (in-flight tracking): the heads
    /// resubmitted, in order, and the ring's new next available position.
    /// The resubmitted requests follow as messages.
    Resubmit,
    /// A message of a type the device or message defines: a virtqueue
    /// request's type as the device named it (`read`, `entropy`), an
    /// MMIO/PIO access (`read`, `write`), an interrupt or an input.
    Message(&'static str),
}

impl RecordKind {
    /// Every kind but [`RecordKind::Message`].
    pub const KNOWN: [RecordKind; 16] = [
        RecordKind::Added,
        RecordKind::Removed,
        RecordKind::Gap,
        RecordKind::Connect,
        RecordKind::Disconnect,
        RecordKind::SetFeatures,
        RecordKind::GetConfig,
        RecordKind::SetConfig,
        RecordKind::SetMemTable,
        RecordKind::GetVringBase,
        RecordKind::ResetDevice,
        RecordKind::Malformed,
        RecordKind::Failed,
        RecordKind::Irq,
        RecordKind::Input,
        RecordKind::Resubmit,
    ];

    /// The `type` field as written.
    pub const fn as_str(self) -> &'static str {
        match self {
            RecordKind::Added => "added",
            RecordKind::Removed => "removed",
            RecordKind::Gap => "gap",
            RecordKind::Connect => "connect",
            RecordKind::Disconnect => "disconnect",
            RecordKind::SetFeatures => "SET_FEATURES",
            RecordKind::GetConfig => "GET_CONFIG",
            RecordKind::SetConfig => "SET_CONFIG",
            RecordKind::SetMemTable => "SET_MEM_TABLE",
            RecordKind::GetVringBase => "GET_VRING_BASE",
            RecordKind::ResetDevice => "RESET_DEVICE",
            RecordKind::Malformed => "malformed",
            RecordKind::Failed => "failed",
            RecordKind::Irq => "irq",
            RecordKind::Input => "input",
            RecordKind::Resubmit => "resubmit",
            RecordKind::Message(s) => s,
        }
    }

    /// The kind a `type` field names; anything that is not one of
    /// [`RecordKind::KNOWN`] is a [`RecordKind::Message`] (of a type only
    /// its device knows).
    pub fn parse(s: &str) -> ParsedKind<'_> {
        match Self::KNOWN.iter().find(|k| k.as_str() == s) {
            Some(k) => ParsedKind::Known(*k),
            None => ParsedKind::Message(s),
        }
    }

    /// Whether records of this kind are messages a device handled or sent
    /// (and replay compares), rather than the log's or the connection's own.
    pub fn is_message(self) -> bool {
        matches!(
            self,
            RecordKind::Message(_) | RecordKind::Irq | RecordKind::Input
        )
    }
}

/// A kind read back from a log: the message type borrows the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParsedKind<'a> {
    /// One of [`RecordKind::KNOWN`].
    Known(RecordKind),
    /// A message type.
    Message(&'a str),
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_known_kind_parses_back_to_itself() {
        for k in RecordKind::KNOWN {
            assert_eq!(RecordKind::parse(k.as_str()), ParsedKind::Known(k));
        }
        assert!(RecordKind::Irq.is_message());
        assert!(!RecordKind::Added.is_message());
    }

    #[test]
    fn test_other_types_are_messages() {
        assert_eq!(RecordKind::parse("entropy"), ParsedKind::Message("entropy"));
        assert!(RecordKind::Message("read").is_message());
        assert_eq!(RecordKind::Message("write").as_str(), "write");
    }
}
