#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Instructions per I/O of `serve blk` under callgrind, for two settings A
# and B of the same binary: a stable figure for a change's cost on a noisy
# machine. Runs the backend under valgrind --tool=callgrind and blk_bench
# (one queue, qd 32) against it for 4 s and for 12 s; the difference in
# instructions over the difference in I/Os removes start-up and shutdown.
#
#   cg-ab.sh SWITCHBOARD_BINARY BLK_BENCH_BINARY [randread|randwrite]
#
# Env: A_SERVE_ARGS, B_SERVE_ARGS (extra `serve blk` arguments; `{LOG}`
# becomes a fresh log path in the work directory), A_BENCH_ARGS,
# B_BENCH_ARGS (extra blk_bench arguments), KEEP=1 to keep the work
# directory (its callgrind.out files, for callgrind_annotate).
# Output: one line per side, "A instructions_per_io=N", then B/A.
set -euo pipefail
[ "${1:-}" = -h ] || [ "${1:-}" = --help ] && { sed -n '3,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }
[ $# -ge 2 ] || { echo "cg-ab.sh: expected SWITCHBOARD_BINARY BLK_BENCH_BINARY [RW] (see --help)" >&2; exit 2; }
SB=$1 BENCH=$2 RW=${3:-randwrite}
command -v valgrind >/dev/null || { echo "cg-ab.sh: valgrind is not installed" >&2; exit 2; }
W=$(mktemp -d "${TMPDIR:-/tmp}/cg-ab.XXXXXX")
run() { # SIDE SECONDS -> "instructions ios"
    local side=$1 secs=$2 d=$W/$1-$2 sargs=() bargs=() out
    local svar=${side}_SERVE_ARGS bvar=${side}_BENCH_ARGS
    read -r -a sargs <<< "${!svar:-}"
    read -r -a bargs <<< "${!bvar:-}"
    sargs=("${sargs[@]//\{LOG\}/$d/rec.log}")
    mkdir -p "$d"; truncate -s 256M "$d/img"
    valgrind --tool=callgrind --callgrind-out-file="$d/cg.out" "$SB" serve blk --path "$d/img" \
        --socket-path "$d/s" "${sargs[@]}" >"$d/vg.log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do [ -S "$d/s" ] && break; sleep 0.2; done
    out=$("$BENCH" --socket "$d/s" --rw "$RW" --seconds "$secs" --warmup 0 --io-timeout 60 "${bargs[@]}")
    kill -INT "$pid"; wait "$pid" || true
    rm -f "$d/img"
    echo "$(grep -E '^(summary|totals):' "$d/cg.out" | head -1 | awk '{print $2}') $(sed -n 's/.* ios=\([0-9]*\).*/\1/p' <<< "$out")"
}
declare -A PER
for side in A B; do
    read -r i1 n1 <<< "$(run "$side" 4)"
    read -r i2 n2 <<< "$(run "$side" 12)"
    PER[$side]=$(( (i2 - i1) / (n2 - n1) ))
    echo "$side instructions_per_io=${PER[$side]} ($RW)"
done
awk -v a="${PER[A]}" -v b="${PER[B]}" 'BEGIN { printf "B/A %.4f\n", b / a }'
if [ "${KEEP:-0}" = 1 ]; then echo "kept $W"; else rm -rf "$W"; fi
