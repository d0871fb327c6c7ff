// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Runnable examples of switchboard; see the `[[example]]` entries of this
//! crate and the repository README. Nothing depends on this crate.

#![deny(missing_docs)]
