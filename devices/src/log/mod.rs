// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The log tools: what reads a message log after the run.
//!
//! - [`replay`]: feeds a recorded log back to fresh devices and checks every
//!   answer against the recorded one;
//! - [`inspect`]: lists, filters and summarises a log;
//! - [`convert`]: writes a log again in the other form (JSON Lines or
//!   binary), record for record.
//!
//! The log tools depend on the models ([`crate::models`]) and on the serving
//! layer's record schema ([`crate::vhost_user`]), never on the host.

pub mod convert;
pub mod inspect;
pub mod replay;

use std::path::Path;

use switchboard_runtime::recording::{LogError, LogReader};

/// Opens a log of either form (JSON Lines, version 1, or binary,
/// versions 2 to 4), with the body codecs of this crate known to its reader.
pub fn open(path: &Path) -> Result<LogReader, LogError> {
    LogReader::open(path).map(|r| r.with_render(crate::vhost_user::render_body))
}
