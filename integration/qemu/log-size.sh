#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Bytes per record of a live recording: `serve blk` records a blk_bench run
# (one queue, qd 32, 4 KiB random I/O on a 256 MiB image) and the log's
# size is divided by its records (requests, and the few vhost-user
# messages of the set-up, whose share is below 0.01%).
#
#   log-size.sh SWITCHBOARD_BINARY BLK_BENCH_BINARY [randread|randwrite]
#
# Env: SERVE_ARGS (default "--record-data hash"), SECONDS_PER_RUN (3).
# Output: "RW bytes=N records=N bytes_per_record=X".
set -euo pipefail
[ "${1:-}" = -h ] || [ "${1:-}" = --help ] && { sed -n '3,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }
[ $# -ge 2 ] || { echo "log-size.sh: expected SWITCHBOARD_BINARY BLK_BENCH_BINARY [RW] (see --help)" >&2; exit 2; }
SB=$1 BENCH=$2 RW=${3:-randread}
read -r -a sargs <<< "${SERVE_ARGS:---record-data hash}"
W=$(mktemp -d "${TMPDIR:-/tmp}/log-size.XXXXXX")
trap 'rm -rf "$W"' EXIT
# Written, not sparse: reads then go through the page cache as in use.
dd if=/dev/zero of="$W/img" bs=4k count=65536 status=none
"$SB" serve blk --path "$W/img" --socket-path "$W/s" --record "$W/rec.log" "${sargs[@]}" >"$W/serve.log" 2>&1 &
pid=$!
for _ in $(seq 100); do [ -S "$W/s" ] && break; sleep 0.1; done
"$BENCH" --socket "$W/s" --rw "$RW" --seconds "${SECONDS_PER_RUN:-3}" --warmup 0 >"$W/bench.out"
kill -INT "$pid"; wait "$pid" || true
bytes=$(stat -c %s "$W/rec.log")
records=$("$SB" log --stats "$W/rec.log" | sed -n 's/^\([0-9]*\) record(s) read.*/\1/p')
awk -v rw="$RW" -v b="$bytes" -v r="$records" 'BEGIN { printf "%s bytes=%d records=%d bytes_per_record=%.2f\n", rw, b, r, b / r }'
