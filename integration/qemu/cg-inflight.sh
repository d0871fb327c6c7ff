#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Instructions per I/O of `serve blk` under callgrind, with in-flight
# tracking negotiated or not: a stable figure for the bookkeeping's cost on
# a noisy machine. Runs the backend under valgrind --tool=callgrind and
# blk_bench (one queue, qd 32) against it for 4 s and for 12 s; the
# difference in instructions over the difference in I/Os removes start-up
# and shutdown.
#
#   cg-inflight.sh SWITCHBOARD_BINARY BLK_BENCH_BINARY [randread|randwrite]
#
# Output: one line per mode, "MODE instructions_per_io=N", then the ratio.
set -euo pipefail
[ "${1:-}" = -h ] || [ "${1:-}" = --help ] && { sed -n '3,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }
[ $# -ge 2 ] || { echo "cg-inflight.sh: expected SWITCHBOARD_BINARY BLK_BENCH_BINARY [RW] (see --help)" >&2; exit 2; }
SB=$1 BENCH=$2 RW=${3:-randwrite}
command -v valgrind >/dev/null || { echo "cg-inflight.sh: valgrind is not installed" >&2; exit 2; }
W=$(mktemp -d "${TMPDIR:-/tmp}/cg-inflight.XXXXXX")
run() { # MODE SECONDS -> "instructions ios"
    local mode=$1 secs=$2 d=$W/$1-$2 extra=() out
    mkdir -p "$d"; truncate -s 256M "$d/img"
    valgrind --tool=callgrind --callgrind-out-file="$d/cg.out" "$SB" serve blk --path "$d/img" \
        --socket-path "$d/s" >"$d/vg.log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do [ -S "$d/s" ] && break; sleep 0.2; done
    [ "$mode" = on ] && extra=(--inflight)
    out=$("$BENCH" --socket "$d/s" --rw "$RW" --seconds "$secs" --warmup 0 --io-timeout 60 "${extra[@]}")
    kill -INT "$pid"; wait "$pid" || true
    echo "$(grep -E '^(summary|totals):' "$d/cg.out" | head -1 | awk '{print $2}') $(sed -n 's/.* ios=\([0-9]*\).*/\1/p' <<< "$out")"
}
declare -A PER
for mode in off on; do
    read -r i1 n1 <<< "$(run "$mode" 4)"
    read -r i2 n2 <<< "$(run "$mode" 12)"
    PER[$mode]=$(( (i2 - i1) / (n2 - n1) ))
    echo "$mode instructions_per_io=${PER[$mode]} ($RW)"
done
awk -v a="${PER[off]}" -v b="${PER[on]}" 'BEGIN { printf "on/off %.4f\n", b / a }'
rm -rf "$W"
