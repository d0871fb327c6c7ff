// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Identifiers: actors, devices and message sequence numbers.
//!
//! Each kind of identifier is its own type so that a device id cannot be used
//! where a sequence number is expected, and so on.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The name of an actor as it appears in logs, journals and errors, such as
/// `bus:mmio0` or `dev:com1`. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ActorId(Arc<str>);

impl ActorId {
    /// An actor id from its name.
    pub fn new(name: impl AsRef<str>) -> Self {
        ActorId(Arc::from(name.as_ref()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The user-visible id of a device, as written in a topology (`com1`, `disk0`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(Arc<str>);

impl DeviceId {
    /// A device id from its name.
    pub fn new(name: impl AsRef<str>) -> Self {
        DeviceId(Arc::from(name.as_ref()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id of the actor that hosts this device.
    pub fn actor_id(&self) -> ActorId {
        ActorId::new(format!("dev:{}", self.0))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The number the send path gives a message. Unique and increasing within one
/// [`Runtime`](crate::Runtime), so a journal has a total order of sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}
