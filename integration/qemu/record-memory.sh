#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Peak memory of a recording whose log writer cannot keep up: `serve blk`
# records a blk_bench run (one queue, qd 32, 4 KiB random I/O) while its
# `record-writer` thread is limited to a share of one CPU (a cgroup v1
# `cpu` group holding that thread alone), as behind a disk slower than
# the guest. The recording threads' buffers are bounded in records and in
# bytes; this shows how far the process grows before the devices wait.
#
#   record-memory.sh SWITCHBOARD_BINARY BLK_BENCH_BINARY [randread|randwrite]
#
# Env: SERVE_ARGS (default "--record-data value"), SECONDS_PER_RUN (10),
# WRITER_CPU_PCT (10: the writer's share of one CPU), IMAGE_MB (1024;
# written with urandom once), W (work dir, default ${TMPDIR:-/tmp}/record-memory).
# Needs root and the cgroup v1 cpu controller (/sys/fs/cgroup/cpu).
# Output: "RW iops=N peak_rss_kb=N records=N", and "stalled: ..." when
# blk_bench saw no request complete for 10 s (then iops=none).
# IOPS depend on the image's state in the page cache; the peak is the figure.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=record-memory.sh
. "$H/common.sh"
case ${1:-} in -h|--help) print_help "$0"; exit 0 ;; esac
[ $# -ge 2 ] || die_rc 2 "expected SWITCHBOARD_BINARY BLK_BENCH_BINARY [RW] (see --help)"
SB=$1 BENCH=$2 RW=${3:-randwrite}
case "$RW" in randread|randwrite) ;; *) die_rc 2 "RW must be randread or randwrite, not '$RW'" ;; esac
for b in "$SB" "$BENCH"; do [ -x "$b" ] || die_rc 2 "$b is not an executable"; done
PCT=${WRITER_CPU_PCT:-10}
[[ $PCT =~ ^[1-9][0-9]*$ ]] && [ "$PCT" -le 100 ] || die_rc 2 "WRITER_CPU_PCT must be 1 to 100, not '$PCT'"
CPU=/sys/fs/cgroup/cpu
[ -w "$CPU/tasks" ] || die "needs root and the cgroup v1 cpu controller at $CPU"
read -r -a sargs <<< "${SERVE_ARGS:---record-data value}"
W=${W:-${TMPDIR:-/tmp}/record-memory}
mkdir -p "$W"
if [ ! -f "$W/img" ] || [ "$(stat -c %s "$W/img")" -ne $(( ${IMAGE_MB:-1024} << 20 )) ]; then
    echo "$PROG: writing a ${IMAGE_MB:-1024} MiB image" >&2
    dd if=/dev/urandom of="$W/img" bs=1M count="${IMAGE_MB:-1024}" status=none
fi

CG=$CPU/switchboard-record-memory.$$
mkdir "$CG"
echo 100000 > "$CG/cpu.cfs_period_us"
echo $(( PCT * 1000 )) > "$CG/cpu.cfs_quota_us"
rm -f "$W/s" "$W/rec.log"
"$SB" serve blk --path "$W/img" --socket-path "$W/s" --record "$W/rec.log" "${sargs[@]}" >"$W/serve.log" 2>&1 &
pid=$!
cleanup() {
    kill -INT "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # A thread leaves the group when it ends; the group can then go.
    rmdir "$CG" 2>/dev/null || true
    rm -f "$W/rec.log"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$W/s" ] && break; sleep 0.1; done
[ -S "$W/s" ] || die "serve blk did not start (see $W/serve.log)"
found=0
for t in /proc/"$pid"/task/*; do
    if [ "$(cat "$t/comm" 2>/dev/null)" = record-writer ]; then
        echo "${t##*/}" > "$CG/tasks"
        found=1
    fi
done
[ "$found" = 1 ] || die "serve blk has no record-writer thread (see $W/serve.log)"
# blk_bench fails when no request completes for 10 s: a device that waits
# that long for the writer. Reported, not fatal.
out=$("$BENCH" --socket "$W/s" --rw "$RW" --seconds "${SECONDS_PER_RUN:-10}" --warmup 0 2>&1) || true
hwm=$(awk '/^VmHWM/ {print $2}' /proc/"$pid"/status)
# Let the writer catch up at full speed before the log is closed.
echo -1 > "$CG/cpu.cfs_quota_us"
kill -INT "$pid"
wait "$pid" || die "serve blk failed (see $W/serve.log)"
records=$(sed -n 's/.*recorded \([0-9]*\) records.*/\1/p' "$W/serve.log" | tail -n 1)
iops=$(sed -n 's/.* iops=\([0-9]*\).*/\1/p' <<< "$out")
stalled=$(grep -o 'no request completed within [0-9]*s' <<< "$out" || true)
echo "$RW iops=${iops:-none} peak_rss_kb=$hwm records=${records:-?}${stalled:+ stalled: $stalled}"
