#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Instructions per I/O of `serve blk` under callgrind, with in-flight
# tracking negotiated (B) or not (A): cg-ab.sh with B_BENCH_ARGS=--inflight.
#
#   cg-inflight.sh SWITCHBOARD_BINARY BLK_BENCH_BINARY [randread|randwrite]
set -euo pipefail
[ "${1:-}" = -h ] || [ "${1:-}" = --help ] && { sed -n '3,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }
A_BENCH_ARGS='' B_BENCH_ARGS=--inflight exec "$(dirname "$0")/cg-ab.sh" "$@"
