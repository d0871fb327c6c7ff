// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Cross-crate tests and benchmarks of switchboard.
//!
//! The tests live in `tests/` and the benchmarks in `benches/`; this library
//! holds what they share: [`frontend`], a vhost-user test driver built on the
//! `vhost` crate's frontend. See `docs/TESTING.md` for what each test proves.

#![deny(missing_docs)]

pub mod frontend;
