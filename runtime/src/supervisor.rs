// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The supervisor: where device failures are reported.
//!
//! A device actor that catches a panic in its device answers its pending
//! accesses, stops, and sends [`DeviceFailed`] here. The supervisor logs it and
//! keeps the list for [`QueryFailures`], every failure of every instance of a
//! device. It never restarts a device itself: a failed device's state is
//! suspect, so a restart is a fresh instance, which only the host can build
//! (the devices crate's fleet does, for a vhost-user device whose topology
//! asks for it).

use actix::prelude::*;
use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;

/// A device panicked and was stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct DeviceFailed {
    /// The device.
    pub id: DeviceId,
    /// Which method panicked, and the panic message.
    pub reason: String,
}

/// Asks the supervisor for every failure it has seen.
#[derive(Clone, Copy, Debug, Default, Message)]
#[rtype(result = "Vec<DeviceFailed>")]
pub struct QueryFailures;

/// Collects device failures.
#[derive(Debug, Default)]
pub struct Supervisor {
    failures: Vec<DeviceFailed>,
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

impl Handler<DeviceFailed> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: DeviceFailed, _: &mut Context<Self>) {
        tracing::error!(device = %msg.id, reason = %msg.reason, "supervisor: device failed and was stopped");
        self.failures.push(msg);
    }
}

impl Handler<QueryFailures> for Supervisor {
    type Result = MessageResult<QueryFailures>;

    fn handle(&mut self, _: QueryFailures, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.failures.clone())
    }
}
