#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# A/B benchmark of two switchboard binaries on the backend-bound
# vhost-user-blk workload of bench-backend.sh (blk_bench, no guest): for a
# change that could slow the hot path, A is the binary built from main
# before the change and B the one after.
#
#   bench-ab.sh A_BINARY B_BINARY
#
# ROUNDS rounds; each round runs A and B (A first in odd rounds, B first in
# even ones, so neither always runs on a warmer machine), each for randread
# then randwrite on the same fully written image. The table gives, per
# workload, the median IOPS and median backend CPU per I/O of each binary
# over the rounds, and the ratios B/A of those medians, plus the median of
# the per-round ratios (robust to a noisy round).
#
# Env: ROUNDS (5), SECONDS_PER_RUN (5), WARMUP (1), IODEPTH (32),
#      IMAGE_MB (1024), W (work dir, default ${TMPDIR:-/tmp}/bench-ab),
#      OURS_ARGS (extra arguments for both `serve blk`), A_BENCH_ARGS and
#      B_BENCH_ARGS (extra blk_bench arguments for A's runs or B's; e.g.
#      B_BENCH_ARGS=--inflight with the same binary twice measures the
#      in-flight bookkeeping), A_SERVE_ARGS and B_SERVE_ARGS (extra
#      `serve blk` arguments for one side; `{LOG}` in them becomes a fresh
#      log path per run, deleted after the run, its size per request
#      printed; e.g. B_SERVE_ARGS="--record {LOG} --record-data hash"
#      with the same binary twice measures recording).
# Exit 0 when every run completed, 1 otherwise, 2 on bad usage.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=bench-ab.sh
. "$H/common.sh"

case ${1:-} in -h|--help) print_help "$0"; exit 0 ;; esac
[ $# = 2 ] || die_rc 2 "want two binaries, A and B (see --help)"
A=$1 B=$2
for bin in "$A" "$B"; do [ -x "$bin" ] || die_rc 2 "$bin is not an executable"; done
ROUNDS=${ROUNDS:-5} SECONDS_PER_RUN=${SECONDS_PER_RUN:-5} WARMUP=${WARMUP:-1}
IODEPTH=${IODEPTH:-32} IMAGE_MB=${IMAGE_MB:-1024}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die_rc 2 "ROUNDS must be a positive number, not '$ROUNDS'"

ROOT=$(cd "$H/../.." && pwd)
W=${W:-${TMPDIR:-/tmp}/bench-ab}
mkdir -p "$W"
IMG=$W/disk.img
TDIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
note "building blk_bench"
(cd "$ROOT" && cargo build --release --quiet -p switchboard-integration --bin blk_bench)
BENCH=$TDIR/release/blk_bench

PID='' SOCK=''
cleanup() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -f "$W"/*.sock "$IMG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

note "writing a ${IMAGE_MB} MiB image $IMG (4 KiB writes: see bench-backend.sh --help)"
dd if=/dev/urandom of="$IMG" bs=4k count=$((IMAGE_MB * 256)) status=none

field() { grep -o " $1=[0-9.a-z]*" <<< "$2" | head -n 1 | cut -d= -f2 || true; }
declare -A IOPS=() CPU=()
fail=0
run_one() { # run_one LABEL BINARY ROUND
    local label=$1 bin=$2 round=$3 extra=() bargs=()
    read -r -a extra <<< "${OURS_ARGS:-}"
    local bvar=${label}_BENCH_ARGS svar=${label}_SERVE_ARGS sargs=() log=$W/$label-$round.rec
    read -r -a bargs <<< "${!bvar:-}"
    read -r -a sargs <<< "${!svar:-}"
    sargs=("${sargs[@]//\{LOG\}/$log}")
    rm -f "$log"
    local requests=0
    SOCK=$W/$label.sock
    rm -f "$SOCK"
    "$bin" serve blk --path "$IMG" --socket-path "$SOCK" "${extra[@]}" "${sargs[@]}" > "$W/$label.log" 2>&1 &
    PID=$!
    if ! await_socket "$PID" "$SOCK" "$W/$label.log"; then
        note "$label did not start: $AWAIT_WHY"; fail=1; PID=; return
    fi
    for rw in randread randwrite; do
        sync "$IMG"
        local out
        if out=$("$BENCH" --socket "$SOCK" --backend "$label" --rw "$rw" --iodepth "$IODEPTH" \
            --seconds "$SECONDS_PER_RUN" --warmup "$WARMUP" --pid "$PID" \
            --verify 16 --sample 1000 --image "$IMG" "${bargs[@]}" 2> "$W/$label-$rw.err"); then
            IOPS[$label:$rw:$round]=$(field iops "$out")
            CPU[$label:$rw:$round]=$(field backend_cpu_us_per_io "$out")
            requests=$((requests + $(field ios "$out")))
            note "round $round $label $rw: iops=${IOPS[$label:$rw:$round]} cpu_us_per_io=${CPU[$label:$rw:$round]}"
        else
            note "$label $rw failed: $(tail -n 3 "$W/$label-$rw.err")"; fail=1
        fi
    done
    kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=
    rm -f "$SOCK"
    if [ -f "$log" ]; then
        local bytes
        bytes=$(stat -c %s "$log")
        note "round $round $label: log $bytes bytes for $requests requests ($(awk -v b="$bytes" -v n="$requests" 'BEGIN { if (n > 0) printf "%.1f", b / n; else print "-" }') bytes per request, warm-up included)"
        rm -f "$log"
    fi
}

for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="A B"; else order="B A"; fi
    for label in $order; do
        if [ "$label" = A ]; then run_one A "$A" "$round"; else run_one B "$B" "$round"; fi
    done
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
values() { # values ARRAY LABEL RW
    local -n arr=$1
    for round in $(seq 1 "$ROUNDS"); do
        [ -n "${arr[$2:$3:$round]:-}" ] && echo "${arr[$2:$3:$round]}"
    done
    return 0
}
ratios() { # ratios ARRAY RW: B/A per round
    local -n arr=$1
    for round in $(seq 1 "$ROUNDS"); do
        local a=${arr[A:$2:$round]:-} b=${arr[B:$2:$round]:-}
        [ -n "$a" ] && [ -n "$b" ] && awk -v a="$a" -v b="$b" 'BEGIN { printf "%.4f\n", b / a }'
    done
    return 0
}
echo
echo "bench-ab: A=$A"
echo "          B=$B"
echo "4 KiB random I/O, one queue, qd=$IODEPTH, ${SECONDS_PER_RUN} s per run, $ROUNDS rounds alternating, $(nproc) CPUs, no guest"
printf '%-10s %12s %12s %8s %10s %12s %12s %8s %10s\n' rw "A IOPS" "B IOPS" "B/A" "B/A rnd" \
    "A us/IO" "B us/IO" "B/A" "B/A rnd"
for rw in randread randwrite; do
    ai=$(values IOPS A $rw | median) bi=$(values IOPS B $rw | median)
    ac=$(values CPU A $rw | median) bc=$(values CPU B $rw | median)
    ri=$(ratios IOPS $rw | median) rc=$(ratios CPU $rw | median)
    r() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a == 0) print "-"; else printf "%.3f", b / a }'; }
    printf '%-10s %12s %12s %8s %10s %12s %12s %8s %10s\n' "$rw" "$ai" "$bi" "$(r "$ai" "$bi")" "$ri" \
        "$ac" "$bc" "$(r "$ac" "$bc")" "$rc"
done
exit $fail
