// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! libFuzzer target: `switchboard_integration::fuzzing::fuzz_blk_request`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_integration::fuzzing;

fuzz_target!(|data: &[u8]| fuzzing::fuzz_blk_request(data));
