#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Where hashed recording's cost goes, stage by stage: `serve blk` under
# blk_bench (thread-cpu.sh: one queue, qd 32, no guest), unrecorded and
# recorded with `--record-data hash`, each record dropped after one of its
# stages (`--test-record-until`, test only):
#
#   none     not recorded (the baseline)
#   hash     the request's data hashed (once per block), nothing built
#   capture  the request's trace built, its data hashed, then dropped
#   encode   ... and encoded into a buffer of the recording thread's own
#   slot     ... and put in the thread's slot with its seq; the log writer
#            takes it and drops it
#   whole    written to the log: recording as it is
#
# The sides alternate, round after round (this machine is noisy: one
# side's IOPS moves by a fifth between rounds). Each side's figures are
# medians over the rounds of its ratio to the baseline of the same round:
# IOPS, and the user and system CPU time per I/O it adds.
#
#   record-stages.sh SWITCHBOARD_BINARY BLK_BENCH_BINARY [randread|randwrite] [ROUNDS]
#
# ROUNDS defaults to 8; the first round also warms the page cache and is
# left out. Env: SECONDS_PER_RUN (5), W (work dir), as for thread-cpu.sh.
# Output: one line per round and side on stderr, then one line per side.
set -euo pipefail
[ "${1:-}" = -h ] || [ "${1:-}" = --help ] && { awk 'NR > 2 && /^#/ { sub(/^# ?/, ""); print; next } NR > 2 { exit }' "$0"; exit 0; }
[ $# -ge 2 ] || { echo "record-stages.sh: expected SWITCHBOARD_BINARY BLK_BENCH_BINARY [RW] [ROUNDS] (see --help)" >&2; exit 2; }
SB=$1 BENCH=$2 RW=${3:-randread} ROUNDS=${4:-8}
case "$ROUNDS" in ''|*[!0-9]*) echo "record-stages.sh: ROUNDS must be a number, not '$ROUNDS'" >&2; exit 2;; esac
[ "$ROUNDS" -ge 2 ] || { echo "record-stages.sh: ROUNDS must be at least 2 (the first is left out)" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
SIDES=(none hash capture encode slot whole)
args_of() {
    case $1 in
        none) ;;
        whole) echo "--record {LOG} --record-data hash" ;;
        *) echo "--record {LOG} --record-data hash --test-record-until $1" ;;
    esac
}
RES=$(mktemp "${TMPDIR:-/tmp}/record-stages.XXXXXX")
trap 'rm -f "$RES"' EXIT
for r in $(seq "$ROUNDS"); do
    for side in "${SIDES[@]}"; do
        read -r -a extra <<< "$(args_of "$side")"
        out=$("$HERE/thread-cpu.sh" "$SB" "$BENCH" "$RW" "${extra[@]}" 2>&1) || { echo "$out" >&2; exit 1; }
        line="$r $side $(awk '$1 == "total" { sub("user_us=", "", $2); sub("sys_us=", "", $3); print $2, $3 }' <<< "$out") $(sed -n 's/.* iops=\([0-9]*\).*/\1/p' <<< "$out")"
        echo "round $line" >&2
        echo "$line" >> "$RES"
    done
done
# Per side: the medians over rounds 2.. of iops/iops(none), user - user(none)
# and sys - sys(none), each against the same round's baseline.
awk -v sides="${SIDES[*]}" '
    function median(a, n,   i, j, t) {
        for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    $1 > 1 { u[$1, $2] = $3; s[$1, $2] = $4; io[$1, $2] = $5; if ($1 > last) last = $1 }
    END {
        n = split(sides, side, " ")
        for (k = 1; k <= n; k++) {
            m = 0
            for (r = 2; r <= last; r++) {
                m++
                ratio[m] = io[r, side[k]] / io[r, "none"]
                du[m] = u[r, side[k]] - u[r, "none"]
                ds[m] = s[r, side[k]] - s[r, "none"]
                iops[m] = io[r, side[k]]
            }
            printf "%-8s rounds=%d iops=%.0f ratio=%.3f user_us=%+.2f sys_us=%+.2f\n", side[k], m, median(iops, m), median(ratio, m), median(du, m), median(ds, m)
        }
    }' "$RES"
