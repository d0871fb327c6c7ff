#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# User and system CPU time per I/O of each thread of `serve blk` under
# blk_bench (one queue, qd 32, no guest): where a change's CPU goes, by
# thread (the queue worker, the blk I/O threads, the log writer), and
# whether it is user or kernel time. Threads are summed by name; a thread
# made during the run (the queue worker of blk_bench's connection) counts
# from zero.
#
#   thread-cpu.sh SWITCHBOARD_BINARY BLK_BENCH_BINARY [randread|randwrite] [SERVE_ARGS...]
#
# `{LOG}` in SERVE_ARGS becomes a fresh log path in the work directory,
# e.g. `thread-cpu.sh SB BLK_BENCH randread --record {LOG} --record-data hash`.
# Env: SECONDS_PER_RUN (5), IMAGE_MB (1024; written with urandom once),
# W (work dir, default ${TMPDIR:-/tmp}/thread-cpu).
# Output: one line per thread name, "NAME user_us=U sys_us=S" per I/O;
# "(ended threads)", the process's time less its living threads' (the
# queue worker, whose connection ends with blk_bench); "total", the
# process's; then "ios=N iops=N".
set -euo pipefail
[ "${1:-}" = -h ] || [ "${1:-}" = --help ] && { awk 'NR > 2 && /^#/ { sub(/^# ?/, ""); print; next } NR > 2 { exit }' "$0"; exit 0; }
[ $# -ge 2 ] || { echo "thread-cpu.sh: expected SWITCHBOARD_BINARY BLK_BENCH_BINARY [RW] [SERVE_ARGS...] (see --help)" >&2; exit 2; }
SB=$1 BENCH=$2 RW=${3:-randread}
shift $(( $# >= 3 ? 3 : 2 ))
case "$RW" in randread|randwrite) ;; *) echo "thread-cpu.sh: RW must be randread or randwrite, not '$RW'" >&2; exit 2;; esac
for b in "$SB" "$BENCH"; do [ -x "$b" ] || { echo "thread-cpu.sh: $b is not an executable" >&2; exit 2; }; done
W=${W:-${TMPDIR:-/tmp}/thread-cpu}
SECS=${SECONDS_PER_RUN:-5}
mkdir -p "$W"
if [ ! -f "$W/img" ] || [ "$(stat -c %s "$W/img")" -ne $(( ${IMAGE_MB:-1024} << 20 )) ]; then
    echo "thread-cpu.sh: writing a ${IMAGE_MB:-1024} MiB image" >&2
    dd if=/dev/urandom of="$W/img" bs=1M count="${IMAGE_MB:-1024}" status=none
fi
rm -f "$W/s" "$W/rec.log"
args=("${@//\{LOG\}/$W/rec.log}")
"$SB" serve blk --path "$W/img" --socket-path "$W/s" "${args[@]}" >"$W/serve.log" 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$W/s" ] && break; sleep 0.1; done
[ -S "$W/s" ] || { echo "thread-cpu.sh: serve blk did not start (see $W/serve.log)" >&2; exit 1; }
# One second first: the I/O threads exist and the log has its names.
"$BENCH" --socket "$W/s" --rw "$RW" --seconds 1 --warmup 0 >/dev/null
# utime and stime (fields 14 and 15 of stat; the name in parentheses may
# hold spaces, so fields are counted from the last ')': field 3 is the
# first after it, $2 here, after the name).
snap() {
    for t in /proc/"$pid" /proc/"$pid"/task/*; do
        { name=$(tr ' ' _ < "$t/comm") && stat=$(cat "$t/stat"); } 2>/dev/null || continue
        [ "$t" = /proc/"$pid" ] && name=.process
        echo "$name ${stat##*) }"
    done | awk '{u[$1] += $13; s[$1] += $14} END {for (n in u) print n, u[n], s[n]}' | LC_ALL=C sort
}
snap > "$W/before"
out=$("$BENCH" --socket "$W/s" --rw "$RW" --seconds "$SECS" --warmup 0)
snap > "$W/after"
ios=$(sed -n 's/.* ios=\([0-9]*\).*/\1/p' <<< "$out")
iops=$(sed -n 's/.* iops=\([0-9]*\).*/\1/p' <<< "$out")
[ -n "$ios" ] && [ "$ios" -gt 0 ] || { echo "thread-cpu.sh: blk_bench gave no I/O count: $out" >&2; exit 1; }
LC_ALL=C join -a 2 -e 0 -o 0,1.2,1.3,2.2,2.3 "$W/before" "$W/after" | awk -v n="$ios" -v t="$(getconf CLK_TCK)" '
    { u = ($4 - $2) / t * 1e6 / n; s = ($5 - $3) / t * 1e6 / n }
    $1 == ".process" { PU = u; PS = s; next }
    { U += u; S += s; if (u + s > 0.005) printf "%-20s user_us=%.2f sys_us=%.2f\n", $1, u, s }
    END {
        printf "%-20s user_us=%.2f sys_us=%.2f\n", "(ended threads)", PU - U, PS - S
        printf "%-20s user_us=%.2f sys_us=%.2f\n", "total", PU, PS
    }'
echo "ios=$ios iops=$iops"
